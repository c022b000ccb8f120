// SPDX-License-Identifier: GPL-2.0
/*
 * fake_gpu_pci: NVIDIA GPUs on a virtual PCI root bus, for nvidia-agent's
 * QEMU guest tests (QEMU cannot emulate a device with vendor 0x10de).
 *
 * The module creates PCI domain 0x10de (bus 00) whose config space is served
 * by the functions below, so the guest gets real struct pci_dev devices:
 * sysfs entries under /sys/bus/pci/devices/10de:00:SS.0, uevents, libudev
 * and pyudev enumeration, driver binding (the nvidia stand-in binds to the
 * GPUs). Devices have no BARs, no interrupts and no capabilities; config
 * writes are ignored.
 *
 *   slot 0 .. gpus-1: NVIDIA GPUs; even slots 10de:2330 class 0x030200
 *                     (3D controller, H100 SXM5), odd slots 10de:2204 class
 *                     0x030000 (VGA, RTX 3090)
 *   slot gpus:        10de:1aef class 0x040300 (HDA audio): an NVIDIA
 *                     function that is NOT a GPU
 *
 * gpus=N (default 2, at most 16) chooses the number of GPUs; domain=D
 * another domain number. Unloading removes the bus and its devices.
 */
#include <linux/init.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pci.h>
#include <linux/slab.h>

#define FAKE_MAX_GPUS 16
#define FAKE_CFG_SIZE 256

static unsigned int gpus = 2;
module_param(gpus, uint, 0444);
MODULE_PARM_DESC(gpus, "number of fake NVIDIA GPUs (0..16, default 2)");

static int domain = 0x10de;
module_param(domain, int, 0444);
MODULE_PARM_DESC(domain, "PCI domain of the fake root bus (default 0x10de)");

struct fake_fn {
	u16 device;
	u32 class; /* class << 8 | prog-if */
	u16 subsys_device;
};

static const struct fake_fn h100 = { 0x2330, 0x030200, 0x16c1 };
static const struct fake_fn rtx3090 = { 0x2204, 0x030000, 0x147d };
static const struct fake_fn hda = { 0x1aef, 0x040300, 0x147d };

static u8 (*config)[FAKE_CFG_SIZE]; /* one config space per slot, slots 0..gpus */
static struct pci_sysdata sysdata;
static struct pci_bus *root_bus;

static void fill_config(u8 *cfg, const struct fake_fn *fn)
{
	memset(cfg, 0, FAKE_CFG_SIZE);
	*(__le16 *)(cfg + PCI_VENDOR_ID) = cpu_to_le16(PCI_VENDOR_ID_NVIDIA);
	*(__le16 *)(cfg + PCI_DEVICE_ID) = cpu_to_le16(fn->device);
	*(__le32 *)(cfg + PCI_CLASS_REVISION) = cpu_to_le32(fn->class << 8 | 0xa1);
	cfg[PCI_HEADER_TYPE] = PCI_HEADER_TYPE_NORMAL; /* single function */
	*(__le16 *)(cfg + PCI_SUBSYSTEM_VENDOR_ID) = cpu_to_le16(PCI_VENDOR_ID_NVIDIA);
	*(__le16 *)(cfg + PCI_SUBSYSTEM_ID) = cpu_to_le16(fn->subsys_device);
	/* BARs, expansion ROM, capabilities pointer, interrupt pin: all 0. */
}

static u8 *slot_config(struct pci_bus *bus, unsigned int devfn)
{
	if (bus->number != 0 || PCI_FUNC(devfn) != 0 || PCI_SLOT(devfn) > gpus)
		return NULL;
	return config[PCI_SLOT(devfn)];
}

static int fake_read(struct pci_bus *bus, unsigned int devfn, int where, int size, u32 *val)
{
	u8 *cfg = slot_config(bus, devfn);

	if (!cfg || where < 0 || where + size > FAKE_CFG_SIZE) {
		*val = ~0U;
		return PCIBIOS_DEVICE_NOT_FOUND;
	}
	switch (size) {
	case 1:
		*val = cfg[where];
		break;
	case 2:
		*val = le16_to_cpup((__le16 *)(cfg + where));
		break;
	case 4:
		*val = le32_to_cpup((__le32 *)(cfg + where));
		break;
	default:
		*val = ~0U;
		return PCIBIOS_BAD_REGISTER_NUMBER;
	}
	return PCIBIOS_SUCCESSFUL;
}

static int fake_write(struct pci_bus *bus, unsigned int devfn, int where, int size, u32 val)
{
	/* Ignored: BAR sizing reads back 0 (no BAR), command writes change nothing. */
	return slot_config(bus, devfn) ? PCIBIOS_SUCCESSFUL : PCIBIOS_DEVICE_NOT_FOUND;
}

static struct pci_ops fake_ops = {
	.read = fake_read,
	.write = fake_write,
};

static bool domain_in_use(int nr)
{
	struct pci_bus *bus = NULL;

	while ((bus = pci_find_next_bus(bus)) != NULL) {
		if (pci_domain_nr(bus) == nr)
			return true;
	}
	return false;
}

static int __init fake_gpu_init(void)
{
	LIST_HEAD(resources);
	unsigned int slot;

	if (gpus > FAKE_MAX_GPUS)
		return -EINVAL;
	if (domain_in_use(domain)) {
		pr_err("fake_gpu_pci: PCI domain %04x is already in use\n", domain);
		return -EBUSY;
	}
	config = kcalloc(gpus + 1, FAKE_CFG_SIZE, GFP_KERNEL);
	if (!config)
		return -ENOMEM;
	for (slot = 0; slot < gpus; slot++)
		fill_config(config[slot], slot % 2 ? &rtx3090 : &h100);
	fill_config(config[gpus], &hda);

	sysdata.domain = domain;
	sysdata.node = NUMA_NO_NODE;

	pci_lock_rescan_remove();
	root_bus = pci_scan_root_bus(NULL, 0, &fake_ops, &sysdata, &resources);
	if (root_bus)
		pci_bus_add_devices(root_bus);
	pci_unlock_rescan_remove();
	if (!root_bus) {
		pci_free_resource_list(&resources);
		kfree(config);
		return -ENODEV;
	}
	pr_info("fake_gpu_pci: PCI domain %04x with %u NVIDIA GPUs and 1 audio function\n", domain, gpus);
	return 0;
}

static void __exit fake_gpu_exit(void)
{
	pci_lock_rescan_remove();
	pci_stop_root_bus(root_bus);
	pci_remove_root_bus(root_bus);
	pci_unlock_rescan_remove();
	kfree(config);
	pr_info("fake_gpu_pci: removed PCI domain %04x\n", domain);
}

module_init(fake_gpu_init);
module_exit(fake_gpu_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Fake NVIDIA GPUs on a virtual PCI bus (nvidia-agent tests)");
