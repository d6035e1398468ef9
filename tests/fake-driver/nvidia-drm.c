// SPDX-License-Identifier: GPL-2.0
/* Fake "nvidia-drm": uses nvidia-modeset's and nvidia's symbols. */
#include <linux/module.h>
#include "fake_nv.h"

static bool modeset;
module_param(modeset, bool, 0444);
static bool fbdev;
module_param(fbdev, bool, 0444);

static int __init fake_init(void)
{
#ifdef FAKE_NV_FAIL_INIT_NVIDIA_DRM
	pr_err("NVRM: fake: nvidia-drm built to fail its init\n");
	return -ENODEV;
#endif
	if (!nv_fake_modeset_ready())
		return -ENODEV;
	pr_info("nvidia-drm: loaded %s against nvidia %s\n", FAKE_NV_VERSION, nv_fake_version());
	return 0;
}

static void __exit fake_exit(void)
{

	pr_info("nvidia-drm: unloaded %s\n", FAKE_NV_VERSION);
}

module_init(fake_init);
module_exit(fake_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("NVIDIA-fake nvidia-drm for tests");
MODULE_VERSION(FAKE_NV_VERSION);
