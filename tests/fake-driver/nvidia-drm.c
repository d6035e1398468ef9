// SPDX-License-Identifier: GPL-2.0
/*
 * Fake "nvidia-drm": uses nvidia-modeset's and nvidia's symbols. With modeset=1 it registers a DRM
 * device, as the real one does (kernel-open/nvidia-drm/nvidia-drm-drv.c registers a drm_device
 * per GPU when modesetting is on): /dev/dri/card<N> appears, and a process that opens it (a
 * compositor, a display manager) pins nvidia_drm through the file's f_op->owner, holding no
 * /dev/nvidia* at all. The real DRM device's parent is the GPU's PCI device, bound to nvidia.ko;
 * here it is a platform device bound to a platform driver of this module, so that
 * /sys/class/drm/card<N>/device/driver/module names the NVIDIA module it belongs to.
 */
#include <linux/module.h>
#include <linux/version.h>
#include <linux/platform_device.h>
#include <drm/drm_drv.h>
#include <drm/drm_file.h>
#include <drm/drm_ioctl.h>
#include "fake_nv.h"

static bool modeset;
module_param(modeset, bool, 0444);
static bool fbdev;
module_param(fbdev, bool, 0444);

static const struct file_operations fake_drm_fops = {
	.owner = THIS_MODULE,
	.open = drm_open,
	.release = drm_release,
	.unlocked_ioctl = drm_ioctl,
	.compat_ioctl = drm_compat_ioctl,
	.poll = drm_poll,
	.read = drm_read,
	.llseek = noop_llseek,
	/* nvidia-drm/nvidia-drm-drv.c nv_drm_fops (550.163.01): set where the kernel has it (conftest
	 * file_operations_fop_unsigned_offset_present); from 6.12 drm_open_helper refuses a file
	 * without it (WARN_ON_ONCE, EINVAL). */
#ifdef FOP_UNSIGNED_OFFSET
	.fop_flags = FOP_UNSIGNED_OFFSET,
#endif
};

static const struct drm_driver fake_drm_driver = {
	.fops = &fake_drm_fops,
	.name = "nvidia-drm",
	.desc = "NVIDIA DRM driver (fake)",
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 14, 0)
	/* Linux 6.14 removed drm_driver.date (commit 7fb8af6798e8); NVIDIA's conftest probes it as
	 * drm_driver_has_date (kernel-open/conftest.sh). */
	.date = "20160202",
#endif
	.major = 0,
	.minor = 0,
};

static struct platform_device *pdev;
static struct drm_device *drm;

static int fake_probe(struct platform_device *p)
{
	return 0;
}

static struct platform_driver fake_platform_driver = {
	.probe = fake_probe,
	.driver = { .name = "nvidia-drm-fake" },
};

static int fake_drm_register(void)
{
	int err = platform_driver_register(&fake_platform_driver);

	if (err)
		return err;
	pdev = platform_device_register_simple("nvidia-drm-fake", -1, NULL, 0);
	if (IS_ERR(pdev)) {
		err = PTR_ERR(pdev);
		goto out_driver;
	}
	drm = drm_dev_alloc(&fake_drm_driver, &pdev->dev);
	if (IS_ERR(drm)) {
		err = PTR_ERR(drm);
		goto out_device;
	}
	err = drm_dev_register(drm, 0);
	if (err)
		goto out_drm;
	return 0;
out_drm:
	drm_dev_put(drm);
out_device:
	platform_device_unregister(pdev);
out_driver:
	platform_driver_unregister(&fake_platform_driver);
	drm = NULL;
	return err;
}

static int __init fake_init(void)
{
	int err;

#ifdef FAKE_NV_FAIL_INIT_NVIDIA_DRM
	pr_err("NVRM: fake: nvidia-drm built to fail its init\n");
	return -ENODEV;
#endif
	if (!nv_fake_modeset_ready())
		return -ENODEV;
	if (modeset) {
		err = fake_drm_register();
		if (err)
			return err;
	}
	pr_info("nvidia-drm: loaded %s against nvidia %s%s\n", FAKE_NV_VERSION, nv_fake_version(),
		modeset ? " (modeset=1: DRM device registered)" : "");
	return 0;
}

static void __exit fake_exit(void)
{
	if (drm) {
		drm_dev_unregister(drm);
		drm_dev_put(drm);
		platform_device_unregister(pdev);
		platform_driver_unregister(&fake_platform_driver);
	}
	pr_info("nvidia-drm: unloaded %s\n", FAKE_NV_VERSION);
}

module_init(fake_init);
module_exit(fake_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("NVIDIA-fake nvidia-drm for tests");
MODULE_VERSION(FAKE_NV_VERSION);
