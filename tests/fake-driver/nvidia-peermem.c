// SPDX-License-Identifier: GPL-2.0
/* Fake "nvidia-peermem": holds nvidia, like the real peer-memory module. */
#include <linux/module.h>
#include "fake_nv.h"

static int __init fake_init(void)
{
#ifdef FAKE_NV_FAIL_INIT_NVIDIA_PEERMEM
	pr_err("NVRM: fake: nvidia-peermem built to fail its init\n");
	return -ENODEV;
#endif

	pr_info("nvidia-peermem: loaded %s against nvidia %s\n", FAKE_NV_VERSION, nv_fake_version());
	return 0;
}

static void __exit fake_exit(void)
{

	pr_info("nvidia-peermem: unloaded %s\n", FAKE_NV_VERSION);
}

module_init(fake_init);
module_exit(fake_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("NVIDIA-fake nvidia-peermem for tests");
MODULE_VERSION(FAKE_NV_VERSION);
