// SPDX-License-Identifier: GPL-2.0
/*
 * Fake "nvidia" core module for the nvidia-kmod-swap test bed.
 * It mimics what userspace and the helper can observe of the real driver:
 * MODULE_VERSION in sysfs, char major 195 ("nvidia-frontend") with GPU minors,
 * nvidiactl (255) and modeset (254), /proc/driver/nvidia/{version,gpus/<bus>/information},
 * exported symbols its sibling modules link against, the real NVRM version check, the char major
 * alias that makes the kernel autoload it, and the dynamic "nvidia-caps" major (MIG capabilities).
 */
#include <linux/module.h>
#include <linux/cdev.h>
#include <linux/device.h>
#include <linux/firmware.h>
#include <linux/fs.h>
#include <linux/mutex.h>
#include <linux/sched.h>
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

/*
 * nvidia-caps: kernel-open/nvidia/nv-caps.c nv_cap_drv_init() takes a dynamic major for 8192 minors
 * (alloc_chrdev_region(..., 0, NV_CAP_DRV_MINOR_COUNT, "nvidia-caps")). Its nodes,
 * /dev/nvidia-caps/nvidia-cap<minor>, are made by nvidia-modprobe (modprobe-utils/
 * nvidia-modprobe-utils.c nvidia_cap_mknod), not udev, with the major read from /proc/devices:
 * after a reload that hands out another major they point at nothing, or at another driver.
 */
#define NV_CAP_DRV_MINOR_COUNT 8192
static dev_t caps_devno;
static struct cdev caps_cdev;
static int caps_open(struct inode *inode, struct file *f) { return 0; }
static const struct file_operations caps_fops = { .owner = THIS_MODULE, .open = caps_open };

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
		/*
		 * The real text since 575.51.02, line breaks and double spaces included, naming the
		 * client: src/nvidia/arch/nvalloc/unix/src/osapi.c RmPerformVersionCheck() in
		 * NVIDIA/open-gpu-kernel-modules 595.45.04 (procName is 32 bytes; current->comm fits).
		 */
		printk(KERN_ERR "NVRM: API mismatch: the client '%s' (pid %u)\n"
		       "NVRM: has the version %s, but this kernel module has\n"
		       "NVRM: the version %s.  Please make sure that this\n"
		       "NVRM: kernel module and all NVIDIA driver components\n"
		       "NVRM: have the same version.\n",
		       current->comm, task_tgid_nr(current), req.client_version, FAKE_NV_VERSION);
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

/*
 * GSP firmware: the real driver requests "nvidia/" NV_VERSION_STRING "/gsp_ga10x.bin"
 * (kernel-open/nvidia/nv.c NV_FIRMWARE_FOR_NAME, nv-firmware.h) when it initialises a GPU, i.e. on
 * the first open of /dev/nvidia<N>, not at module load; open modules have no fallback
 * (osapi.c rm_set_rm_firmware_requested: allow_fallback_to_monolithic_rm = NV_FALSE), so without the
 * file of its own version RmInitAdapter fails (osinit.c RmFetchGspRmImages: "No firmware image
 * found") and the open fails. The firmware loader looks in firmware_class.path first.
 */
#define GSP_FIRMWARE "nvidia/" FAKE_NV_VERSION "/gsp_ga10x.bin"
static struct device *fw_dev;
static DEFINE_MUTEX(gpu_init_lock);
static bool gpu_initialised;

static int nv_init_gpu(void)
{
	const struct firmware *fw;
	int err = 0;

	mutex_lock(&gpu_init_lock);
	if (!gpu_initialised) {
		if (request_firmware(&fw, GSP_FIRMWARE, fw_dev) != 0) {
			pr_err("NVRM: RmFetchGspRmImages: No firmware image found\n");
			pr_err("NVRM: GPU 0000:01:00.0: RmInitAdapter failed! (0x61:0x56:1697)\n");
			err = -EIO;
		} else {
			release_firmware(fw);
			gpu_initialised = true;
		}
	}
	mutex_unlock(&gpu_init_lock);
	return err;
}

static int nv_open(struct inode *inode, struct file *f)
{
	unsigned int minor = iminor(inode);

	if (minor == 255 || minor == 254)
		return 0;
	if (minor < (unsigned int)gpus)
		return nv_init_gpu();
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
	fw_dev = root_device_register("nvidia-fake");
	if (IS_ERR(fw_dev))
		return PTR_ERR(fw_dev);
	err = alloc_chrdev_region(&caps_devno, 0, NV_CAP_DRV_MINOR_COUNT, "nvidia-caps");
	if (err < 0)
		goto out_dev;
	cdev_init(&caps_cdev, &caps_fops);
	caps_cdev.owner = THIS_MODULE;
	err = cdev_add(&caps_cdev, caps_devno, NV_CAP_DRV_MINOR_COUNT);
	if (err < 0)
		goto out_caps;
	err = register_chrdev(NV_MAJOR, "nvidia-frontend", &nv_fops);
	if (err < 0)
		goto out_cdev;
	proc_nvidia = proc_mkdir("driver/nvidia", NULL);
	if (!proc_nvidia) {
		unregister_chrdev(NV_MAJOR, "nvidia-frontend");
		err = -ENOMEM;
		goto out_cdev;
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
out_cdev:
	cdev_del(&caps_cdev);
out_caps:
	unregister_chrdev_region(caps_devno, NV_CAP_DRV_MINOR_COUNT);
out_dev:
	root_device_unregister(fw_dev);
	return err;
}

static void __exit nv_exit(void)
{
	proc_remove(proc_nvidia);
	unregister_chrdev(NV_MAJOR, "nvidia-frontend");
	cdev_del(&caps_cdev);
	unregister_chrdev_region(caps_devno, NV_CAP_DRV_MINOR_COUNT);
	root_device_unregister(fw_dev);
	pr_info("NVRM: unloading NVIDIA UNIX x86_64 Kernel Module  %s (fake)\n", FAKE_NV_VERSION);
}

module_init(nv_init);
module_exit(nv_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("NVIDIA-fake core module for tests");
MODULE_VERSION(FAKE_NV_VERSION);
/*
 * kernel-open/nvidia/nv.c: MODULE_ALIAS_CHARDEV_MAJOR(NV_MAJOR_DEVICE_NUMBER), 195
 * (kernel-open/common/inc/nv-chardev-numbers.h). An open of a /dev/nvidia* node while no driver
 * has major 195 makes the kernel run modprobe char-major-195-<minor>: the module comes back by
 * itself, from whatever tree modprobe reads.
 */
MODULE_ALIAS_CHARDEV_MAJOR(NV_MAJOR);
