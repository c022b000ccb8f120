// SPDX-License-Identifier: GPL-2.0
/*
 * Test stand-in for NVIDIA's nvidia.ko (see nv-stand-in.h). GPL because it is
 * our own test code, not NVIDIA's.
 *
 * - char device major 195 named "nvidia" (/proc/devices: "195 nvidia"):
 *   minors 0..15 are GPUs (open fails with ENODEV unless a GPU with that
 *   index is bound), 254 is nvidia-modeset, 255 is nvidiactl. The agent
 *   creates the nodes. Each open holds a reference on this module
 *   (.owner = THIS_MODULE), so `rmmod nvidia` is refused while a process
 *   keeps /dev/nvidia0 open.
 * - a pci_driver "nvidia" for 10de:* with class 0x0300xx (VGA) or 0x0302xx
 *   (3D controller): it binds to the GPUs of fake_gpu_pci.ko, not to their
 *   audio function (/sys/bus/pci/drivers/nvidia/).
 * - parameters like the real NVreg_* ones, readable in
 *   /sys/module/nvidia/parameters/, and read-only counters there:
 *   gpu_count (bound GPUs), open_count (open files), client_count (modules
 *   using our exports).
 * - require_gpu=1 makes loading fail with ENODEV when no GPU is bound, as
 *   the real driver does ("NVRM: No NVIDIA GPU found").
 */
#include <linux/atomic.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/uaccess.h>

#include "nv-stand-in.h"

static int NVreg_DeviceFileMode = 0666;
module_param(NVreg_DeviceFileMode, int, 0444);
MODULE_PARM_DESC(NVreg_DeviceFileMode, "mode of the device files (as the real driver's)");

static int NVreg_ModifyDeviceFiles = 1;
module_param(NVreg_ModifyDeviceFiles, int, 0444);
MODULE_PARM_DESC(NVreg_ModifyDeviceFiles, "as the real driver's; unused by the stand-in");

static int NVreg_TestParam;
module_param(NVreg_TestParam, int, 0444);
MODULE_PARM_DESC(NVreg_TestParam, "any integer; lets tests prove module options reach the module");

static char *NVreg_RegistryDwords = "";
module_param(NVreg_RegistryDwords, charp, 0444);
MODULE_PARM_DESC(NVreg_RegistryDwords, "as the real driver's; echoed, not interpreted");

static bool require_gpu;
module_param(require_gpu, bool, 0444);
MODULE_PARM_DESC(require_gpu, "fail to load (ENODEV) when no NVIDIA GPU is bound, like the real driver");

static atomic_t open_count = ATOMIC_INIT(0);
static atomic_t client_count = ATOMIC_INIT(0);
static DEFINE_MUTEX(gpu_lock);
static struct pci_dev *gpus[NV_MAX_DEVICES];
static unsigned int gpu_count;

static int get_atomic(char *buffer, const struct kernel_param *kp)
{
	return sysfs_emit(buffer, "%d\n", atomic_read((atomic_t *)kp->arg));
}

static int get_gpu_count(char *buffer, const struct kernel_param *kp)
{
	return sysfs_emit(buffer, "%u\n", READ_ONCE(gpu_count));
}

static const struct kernel_param_ops atomic_ro_ops = { .get = get_atomic };
static const struct kernel_param_ops gpu_count_ops = { .get = get_gpu_count };
module_param_cb(open_count, &atomic_ro_ops, &open_count, 0444);
MODULE_PARM_DESC(open_count, "open files on major 195 (read-only)");
module_param_cb(client_count, &atomic_ro_ops, &client_count, 0444);
MODULE_PARM_DESC(client_count, "modules registered through the exported interfaces (read-only)");
module_param_cb(gpu_count, &gpu_count_ops, NULL, 0444);
MODULE_PARM_DESC(gpu_count, "NVIDIA GPUs bound to this driver (read-only)");

/* ------------------------------------------------------------ exports */

int nvUvmInterfaceRegisterUvmCallbacks(const char *client)
{
	atomic_inc(&client_count);
	pr_info("nvidia: %s registered UVM callbacks\n", client);
	return 0;
}
EXPORT_SYMBOL_GPL(nvUvmInterfaceRegisterUvmCallbacks);

void nvUvmInterfaceDeRegisterUvmOps(void)
{
	atomic_dec(&client_count);
}
EXPORT_SYMBOL_GPL(nvUvmInterfaceDeRegisterUvmOps);

int nvidia_get_rm_ops(const char *client, unsigned int *count)
{
	atomic_inc(&client_count);
	if (count)
		*count = READ_ONCE(gpu_count);
	pr_info("nvidia: %s took the RM ops\n", client);
	return 0;
}
EXPORT_SYMBOL_GPL(nvidia_get_rm_ops);

void nvidia_put_rm_ops(const char *client)
{
	atomic_dec(&client_count);
}
EXPORT_SYMBOL_GPL(nvidia_put_rm_ops);

/* ------------------------------------------------------------ char device */

static int nv_open(struct inode *inode, struct file *file)
{
	unsigned int minor = iminor(inode);

	if (minor < NV_MAX_DEVICES) {
		int present;

		mutex_lock(&gpu_lock);
		present = gpus[minor] != NULL;
		mutex_unlock(&gpu_lock);
		if (!present)
			return -ENODEV;
	} else if (minor != NV_CTL_MINOR && minor != NV_MODESET_MINOR) {
		return -ENODEV;
	}
	atomic_inc(&open_count);
	return 0;
}

static int nv_release(struct inode *inode, struct file *file)
{
	atomic_dec(&open_count);
	return 0;
}

static ssize_t nv_read(struct file *file, char __user *buf, size_t len, loff_t *off)
{
	char msg[96];
	int n = scnprintf(msg, sizeof(msg), "nvidia stand-in %s minor %u\n", NVIDIA_VERSION,
			  iminor(file_inode(file)));

	return simple_read_from_buffer(buf, len, off, msg, n);
}

static const struct file_operations nv_fops = {
	.owner = THIS_MODULE,
	.open = nv_open,
	.release = nv_release,
	.read = nv_read,
	.llseek = noop_llseek,
};

/* ------------------------------------------------------------ PCI driver */

static int nv_pci_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	int i, slot = -ENOSPC;

	mutex_lock(&gpu_lock);
	for (i = 0; i < NV_MAX_DEVICES; i++) {
		if (!gpus[i]) {
			gpus[i] = pdev;
			gpu_count++;
			slot = i;
			break;
		}
	}
	mutex_unlock(&gpu_lock);
	if (slot < 0)
		return slot;
	pci_set_drvdata(pdev, (void *)(long)slot);
	dev_info(&pdev->dev, "nvidia: GPU %04x:%04x is /dev/nvidia%d\n", pdev->vendor, pdev->device, slot);
	return 0;
}

static void nv_pci_remove(struct pci_dev *pdev)
{
	long slot = (long)pci_get_drvdata(pdev);

	mutex_lock(&gpu_lock);
	if (slot >= 0 && slot < NV_MAX_DEVICES && gpus[slot] == pdev) {
		gpus[slot] = NULL;
		gpu_count--;
	}
	mutex_unlock(&gpu_lock);
}

static const struct pci_device_id nv_pci_table[] = {
	{ PCI_DEVICE(PCI_VENDOR_ID_NVIDIA, PCI_ANY_ID), .class = PCI_CLASS_DISPLAY_VGA << 8, .class_mask = ~0 },
	{ PCI_DEVICE(PCI_VENDOR_ID_NVIDIA, PCI_ANY_ID), .class = PCI_CLASS_DISPLAY_3D << 8, .class_mask = ~0 },
	{ }
};
MODULE_DEVICE_TABLE(pci, nv_pci_table);

static struct pci_driver nv_pci_driver = {
	.name = "nvidia",
	.id_table = nv_pci_table,
	.probe = nv_pci_probe,
	.remove = nv_pci_remove,
};

/* ------------------------------------------------------------ init/exit */

static int __init nv_init(void)
{
	int rc = pci_register_driver(&nv_pci_driver);

	if (rc)
		return rc;
	if (require_gpu && READ_ONCE(gpu_count) == 0) {
		pr_err("NVRM: No NVIDIA GPU found.\n");
		pci_unregister_driver(&nv_pci_driver);
		return -ENODEV;
	}
	rc = register_chrdev(NV_MAJOR_DEVICE_NUMBER, "nvidia", &nv_fops);
	if (rc < 0) {
		pci_unregister_driver(&nv_pci_driver);
		return rc;
	}
	pr_info("nvidia: loading NVIDIA stand-in driver %s (%u GPUs, NVreg_TestParam=%d)\n",
		NVIDIA_VERSION, READ_ONCE(gpu_count), NVreg_TestParam);
	return 0;
}

static void __exit nv_exit(void)
{
	unregister_chrdev(NV_MAJOR_DEVICE_NUMBER, "nvidia");
	pci_unregister_driver(&nv_pci_driver);
	pr_info("nvidia: unloaded\n");
}

module_init(nv_init);
module_exit(nv_exit);
MODULE_LICENSE("GPL"); /* test stand-in, not NVIDIA's code */
MODULE_DESCRIPTION("NVIDIA driver stand-in for nvidia-agent tests");
MODULE_VERSION(NVIDIA_VERSION);
MODULE_ALIAS_CHARDEV_MAJOR(NV_MAJOR_DEVICE_NUMBER);
