// SPDX-License-Identifier: GPL-2.0
/*
 * Fake third-party "gdrdrv" (GDRCopy): not part of the NVIDIA driver, has its own version,
 * but links against nvidia's symbols, so it holds nvidia like real out-of-tree users do.
 */
#include <linux/module.h>
#include "fake_nv.h"

static int __init gdrdrv_init(void)
{
	pr_info("gdrdrv: loaded %s against nvidia %s\n", FAKE_GDRDRV_VERSION, nv_fake_version());
	return 0;
}

static void __exit gdrdrv_exit(void)
{
	pr_info("gdrdrv: unloaded %s\n", FAKE_GDRDRV_VERSION);
}

module_init(gdrdrv_init);
module_exit(gdrdrv_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("fake GDRCopy driver for tests");
MODULE_VERSION(FAKE_GDRDRV_VERSION);
