// SPDX-License-Identifier: GPL-2.0
/*
 * Fake "nvidia" core module for the nvidia-kmod-swap test bed.
 * It mimics what userspace and the helper can observe of the real driver:
 * MODULE_VERSION in sysfs, char major 195 ("nvidia-frontend") with GPU minors,
 * nvidiactl (255) and modeset (254), /proc/driver/nvidia/{version,gpus/<bus>/information},
 * exported symbols its sibling modules link against, and the real NVRM version check.
 */
#include <linux/module.h>
#include <linux/fs.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>
#include "fake_nv.h"

static int gpus = 1;
module_param(gpus, int, 0444);
MODULE_PARM_DESC(gpus, "number of fake GPUs (1..32)");

/* A few real NVreg_* parameters, so modprobe.d/kernel command line options show in sysfs. */
static int NVreg_PreserveVideoMemoryAllocations;
module_param(NVreg_PreserveVideoMemoryAllocations, int, 0444);
static int NVreg_DynamicPowerManagement = 3;
module_param(NVreg_DynamicPowerManagement, int, 0444);
static int NVreg_EnableGpuFirmware = 18;
module_param(NVreg_EnableGpuFirmware, int, 0444);
static char *NVreg_TemporaryFilePath = "";
module_param(NVreg_TemporaryFilePath, charp, 0444);

static struct proc_dir_entry *proc_nvidia;

const char *nv_fake_version(void)
{
	return FAKE_NV_VERSION;
}
EXPORT_SYMBOL(nv_fake_version);

int nv_fake_gpu_count(void)
{
	return gpus;
}
EXPORT_SYMBOL(nv_fake_gpu_count);

static long nv_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	struct nv_fake_version_check req;

	if (cmd != NV_FAKE_IOCTL_CHECK_VERSION)
		return -ENOTTY;
	if (copy_from_user(&req, (void __user *)arg, sizeof(req)))
		return -EFAULT;
	req.client_version[sizeof(req.client_version) - 1] = '\0';
	if (strcmp(req.client_version, FAKE_NV_VERSION) != 0) {
		/* The real driver's text, line breaks and double spaces included. */
		printk(KERN_ERR "NVRM: API mismatch: the client has the version %s, but\n"
		       "NVRM: this kernel module has the version %s.  Please\n"
		       "NVRM: make sure that this kernel module and all NVIDIA driver\n"
		       "NVRM: components have the same version.\n",
		       req.client_version, FAKE_NV_VERSION);
		req.reply = 0;
		strscpy(req.client_version, FAKE_NV_VERSION, sizeof(req.client_version));
		if (copy_to_user((void __user *)arg, &req, sizeof(req)))
			return -EFAULT;
		return -EINVAL;
	}
	req.reply = 1;
	if (copy_to_user((void __user *)arg, &req, sizeof(req)))
		return -EFAULT;
	return 0;
}

static int nv_open(struct inode *inode, struct file *f)
{
	unsigned int minor = iminor(inode);

	if (minor == 255 || minor == 254 || minor < (unsigned int)gpus)
		return 0;
	return -ENODEV;
}

static const struct file_operations nv_fops = {
	.owner = THIS_MODULE, /* an open device node pins the module: refcount, EBUSY on unload */
	.open = nv_open,
	.unlocked_ioctl = nv_ioctl,
	.compat_ioctl = nv_ioctl,
};

static int version_show(struct seq_file *m, void *v)
{
	seq_printf(m, "NVRM version: NVIDIA UNIX x86_64 Kernel Module  %s  Thu Jan  1 00:00:00 UTC 1970\n"
		   "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n", FAKE_NV_VERSION);
	return 0;
}

static int information_show(struct seq_file *m, void *v)
{
	long minor = (long)m->private;

	seq_printf(m, "Model: \t\t NVIDIA Fake GPU %ld\n"
		   "IRQ:   \t\t %ld\n"
		   "GPU UUID: \t GPU-00000000-0000-0000-0000-%012ld\n"
		   "Video BIOS: \t 00.00.00.00.00\n"
		   "Bus Type: \t PCIe\n"
		   "DMA Size: \t 47 bits\n"
		   "DMA Mask: \t 0x7fffffffffff\n"
		   "Bus Location: \t 0000:%02lx:00.0\n"
		   "Device Minor: \t %ld\n"
		   "GPU Excluded:\t No\n", minor, 100 + minor, minor, minor + 1, minor);
	return 0;
}

static int __init nv_init(void)
{
	struct proc_dir_entry *gpus_dir;
	int err;
	long i;

	if (gpus < 1 || gpus > 32) {
		pr_err("NVRM: fake: gpus=%d out of range 1..32\n", gpus);
		return -EINVAL;
	}
#ifdef FAKE_NV_FAIL_INIT
	pr_err("NVRM: fake: nvidia built to fail its init\n");
	return -ENODEV;
#endif
	err = register_chrdev(NV_MAJOR, "nvidia-frontend", &nv_fops);
	if (err < 0)
		return err;
	proc_nvidia = proc_mkdir("driver/nvidia", NULL);
	if (!proc_nvidia) {
		unregister_chrdev(NV_MAJOR, "nvidia-frontend");
		return -ENOMEM;
	}
	proc_create_single("version", 0444, proc_nvidia, version_show);
	gpus_dir = proc_mkdir("gpus", proc_nvidia);
	for (i = 0; i < gpus; i++) {
		char bus[16];
		struct proc_dir_entry *dir;

		snprintf(bus, sizeof(bus), "0000:%02lx:00.0", i + 1);
		dir = proc_mkdir(bus, gpus_dir);
		proc_create_single_data("information", 0444, dir, information_show, (void *)i);
	}
	pr_info("NVRM: loading NVIDIA UNIX x86_64 Kernel Module  %s (fake, %d GPUs)\n", FAKE_NV_VERSION, gpus);
	return 0;
}

static void __exit nv_exit(void)
{
	proc_remove(proc_nvidia);
	unregister_chrdev(NV_MAJOR, "nvidia-frontend");
	pr_info("NVRM: unloading NVIDIA UNIX x86_64 Kernel Module  %s (fake)\n", FAKE_NV_VERSION);
}

module_init(nv_init);
module_exit(nv_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("NVIDIA-fake core module for tests");
MODULE_VERSION(FAKE_NV_VERSION);
