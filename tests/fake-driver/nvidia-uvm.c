// SPDX-License-Identifier: GPL-2.0
/* Fake "nvidia-uvm": registers the dynamic char major nvidia-uvm. */
#include <linux/module.h>
#include "fake_nv.h"

#include <linux/fs.h>
static int uvm_major;
static const struct file_operations uvm_fops = { .owner = THIS_MODULE };

static int __init fake_init(void)
{
#ifdef FAKE_NV_FAIL_INIT_NVIDIA_UVM
	pr_err("NVRM: fake: nvidia-uvm built to fail its init\n");
	return -ENODEV;
#endif
	uvm_major = register_chrdev(0, "nvidia-uvm", &uvm_fops);
	if (uvm_major < 0)
		return uvm_major;
	pr_info("nvidia-uvm: loaded %s against nvidia %s\n", FAKE_NV_VERSION, nv_fake_version());
	return 0;
}

static void __exit fake_exit(void)
{
	unregister_chrdev(uvm_major, "nvidia-uvm");
	pr_info("nvidia-uvm: unloaded %s\n", FAKE_NV_VERSION);
}

module_init(fake_init);
module_exit(fake_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("NVIDIA-fake nvidia-uvm for tests");
MODULE_VERSION(FAKE_NV_VERSION);
