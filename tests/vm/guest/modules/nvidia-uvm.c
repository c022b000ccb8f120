// SPDX-License-Identifier: GPL-2.0
/*
 * Test stand-in for NVIDIA's nvidia-uvm.ko (see nv-stand-in.h). GPL: our own
 * test code. Depends on nvidia through nvUvmInterfaceRegisterUvmCallbacks(),
 * so its .modinfo says depends=nvidia, loading it before nvidia fails with
 * "Unknown symbol", and `rmmod nvidia` is refused while it is loaded.
 * Registers a char device with a dynamic major named "nvidia-uvm" (minor 0
 * is /dev/nvidia-uvm, 1 is /dev/nvidia-uvm-tools), as the real module does.
 */
#include <linux/atomic.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/module.h>
#include <linux/moduleparam.h>

#include "nv-stand-in.h"

static int uvm_major;
static atomic_t open_count = ATOMIC_INIT(0);

static int get_major(char *buffer, const struct kernel_param *kp)
{
	return sysfs_emit(buffer, "%d\n", uvm_major);
}

static int get_open_count(char *buffer, const struct kernel_param *kp)
{
	return sysfs_emit(buffer, "%d\n", atomic_read(&open_count));
}

static const struct kernel_param_ops major_ops = { .get = get_major };
static const struct kernel_param_ops open_count_ops = { .get = get_open_count };
module_param_cb(major, &major_ops, NULL, 0444);
MODULE_PARM_DESC(major, "the dynamic major of nvidia-uvm (read-only)");
module_param_cb(open_count, &open_count_ops, NULL, 0444);
MODULE_PARM_DESC(open_count, "open files of nvidia-uvm (read-only)");

static int uvm_open(struct inode *inode, struct file *file)
{
	if (iminor(inode) > 1)
		return -ENODEV;
	atomic_inc(&open_count);
	return 0;
}

static int uvm_release(struct inode *inode, struct file *file)
{
	atomic_dec(&open_count);
	return 0;
}

static const struct file_operations uvm_fops = {
	.owner = THIS_MODULE,
	.open = uvm_open,
	.release = uvm_release,
	.llseek = noop_llseek,
};

static int __init uvm_init(void)
{
	int rc = nvUvmInterfaceRegisterUvmCallbacks("nvidia-uvm");

	if (rc)
		return rc;
	rc = register_chrdev(0, "nvidia-uvm", &uvm_fops);
	if (rc < 0) {
		nvUvmInterfaceDeRegisterUvmOps();
		return rc;
	}
	uvm_major = rc;
	pr_info("nvidia-uvm: stand-in %s loaded, major %d\n", NVIDIA_VERSION, uvm_major);
	return 0;
}

static void __exit uvm_exit(void)
{
	unregister_chrdev(uvm_major, "nvidia-uvm");
	nvUvmInterfaceDeRegisterUvmOps();
}

module_init(uvm_init);
module_exit(uvm_exit);
MODULE_LICENSE("GPL"); /* test stand-in, not NVIDIA's code */
MODULE_DESCRIPTION("NVIDIA UVM stand-in for nvidia-agent tests");
MODULE_VERSION(NVIDIA_VERSION);
