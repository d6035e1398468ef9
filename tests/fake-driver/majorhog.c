// SPDX-License-Identifier: GPL-2.0
/*
 * Not NVIDIA: any driver that takes a dynamic char major (fs/char_dev.c find_dynamic_major hands out
 * the highest free one). Loaded before nvidia and unloaded later, it leaves nvidia's dynamic
 * majors (nvidia-caps, nvidia-uvm) different on the next load, as uptime does on a real machine.
 */
#include <linux/module.h>
#include <linux/fs.h>

static int major;
static const struct file_operations fops = { .owner = THIS_MODULE };

static int __init hog_init(void)
{
	major = register_chrdev(0, "testbed-majorhog", &fops);
	return major < 0 ? major : 0;
}

static void __exit hog_exit(void)
{
	unregister_chrdev(major, "testbed-majorhog");
}

module_init(hog_init);
module_exit(hog_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("test bed: holds a dynamic char major");
