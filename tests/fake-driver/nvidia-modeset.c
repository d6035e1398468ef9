// SPDX-License-Identifier: GPL-2.0
/* Fake "nvidia-modeset": uses nvidia's symbols; nvidia-drm uses its symbol. */
#include <linux/module.h>
#include "fake_nv.h"

int nv_fake_modeset_ready(void)
{
	return nv_fake_gpu_count() > 0;
}
EXPORT_SYMBOL(nv_fake_modeset_ready);

static int __init fake_init(void)
{
#ifdef FAKE_NV_FAIL_INIT_NVIDIA_MODESET
	pr_err("NVRM: fake: nvidia-modeset built to fail its init\n");
	return -ENODEV;
#endif

	pr_info("nvidia-modeset: loaded %s against nvidia %s\n", FAKE_NV_VERSION, nv_fake_version());
	return 0;
}

static void __exit fake_exit(void)
{

	pr_info("nvidia-modeset: unloaded %s\n", FAKE_NV_VERSION);
}

module_init(fake_init);
module_exit(fake_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("NVIDIA-fake nvidia-modeset for tests");
MODULE_VERSION(FAKE_NV_VERSION);
