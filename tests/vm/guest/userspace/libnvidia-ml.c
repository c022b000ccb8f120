/*
 * libnvidia-ml.so.<driver> stand-in (soname libnvidia-ml.so.1) for
 * nvidia-agent's QEMU guest tests. Test code, not NVIDIA's.
 *
 * It talks to the nvidia kernel module the way a program sees it:
 * /sys/module/nvidia/version for the driver version, /dev/nvidiactl held
 * open between nvmlInit_v2 and nvmlShutdown (so the module cannot be
 * unloaded meanwhile), /sys/bus/pci/drivers/nvidia/ for the GPUs. As the
 * real library: NVML_ERROR_DRIVER_NOT_LOADED when the module is not loaded
 * or /dev/nvidiactl cannot be opened, NVML_ERROR_LIB_RM_VERSION_MISMATCH
 * when the loaded module's version is not the library's own.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nvml-stand-in.h"

#ifndef NVIDIA_VERSION
#error "build with -DNVIDIA_VERSION=\"<driver version>\""
#endif

#define EXPORT __attribute__((visibility("default")))
#define NVIDIA_VERSION_FILE "/sys/module/nvidia/version"
#define NVIDIA_CTL "/dev/nvidiactl"
#define NVIDIA_PCI_DRIVER "/sys/bus/pci/drivers/nvidia"
#define MAX_GPUS 64

static int ctl_fd = -1;
static unsigned int init_count;

static int read_module_version(char *buf, size_t size)
{
	FILE *f = fopen(NVIDIA_VERSION_FILE, "r");
	size_t n;

	if (!f)
		return -1;
	n = fread(buf, 1, size - 1, f);
	fclose(f);
	buf[n] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	return n > 0 ? 0 : -1;
}

static int copy_out(char *dest, unsigned int length, const char *src)
{
	if (!dest)
		return NVML_ERROR_INVALID_ARGUMENT;
	if (strlen(src) + 1 > length)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	memcpy(dest, src, strlen(src) + 1);
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInit_v2(void)
{
	char version[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];

	if (init_count > 0) {
		init_count++;
		return NVML_SUCCESS;
	}
	if (read_module_version(version, sizeof(version)) != 0)
		return NVML_ERROR_DRIVER_NOT_LOADED;
	if (strcmp(version, NVIDIA_VERSION) != 0)
		return NVML_ERROR_LIB_RM_VERSION_MISMATCH;
	ctl_fd = open(NVIDIA_CTL, O_RDWR | O_CLOEXEC);
	if (ctl_fd < 0)
		return errno == EACCES || errno == EPERM ? NVML_ERROR_NO_PERMISSION : NVML_ERROR_DRIVER_NOT_LOADED;
	init_count = 1;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlShutdown(void)
{
	if (init_count == 0)
		return NVML_ERROR_UNINITIALIZED;
	if (--init_count == 0) {
		close(ctl_fd);
		ctl_fd = -1;
	}
	return NVML_SUCCESS;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
	switch (result) {
	case NVML_SUCCESS: return "Success";
	case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
	case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
	case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
	case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
	case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
	case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "Driver/library version mismatch";
	default: return "Unknown Error";
	}
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
	char buf[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];

	if (init_count == 0)
		return NVML_ERROR_UNINITIALIZED;
	if (read_module_version(buf, sizeof(buf)) != 0)
		return NVML_ERROR_DRIVER_NOT_LOADED;
	return copy_out(version, length, buf);
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
	return copy_out(version, length, "12." NVIDIA_VERSION);
}

static int compare_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The PCI addresses bound to the nvidia driver, sorted; returns how many (at most MAX_GPUS). */
static unsigned int list_gpus(char *names[MAX_GPUS])
{
	DIR *dir = opendir(NVIDIA_PCI_DRIVER);
	struct dirent *entry;
	unsigned int n = 0;

	if (!dir)
		return 0;
	while ((entry = readdir(dir)) != NULL && n < MAX_GPUS) {
		/* Devices are the links named like 0000:00:05.0 (domain:bus:slot.fn). */
		if (strchr(entry->d_name, ':') && strchr(entry->d_name, '.'))
			names[n++] = strdup(entry->d_name);
	}
	closedir(dir);
	qsort(names, n, sizeof(names[0]), compare_names);
	return n;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
	char *names[MAX_GPUS];
	unsigned int i, n;

	if (init_count == 0)
		return NVML_ERROR_UNINITIALIZED;
	if (!count)
		return NVML_ERROR_INVALID_ARGUMENT;
	n = list_gpus(names);
	for (i = 0; i < n; i++)
		free(names[i]);
	*count = n;
	return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlStandInGetGpu(unsigned int index, char *bus_id, unsigned int length,
				      unsigned int *pci_device)
{
	char *names[MAX_GPUS];
	char path[512];
	unsigned int i, n;
	nvmlReturn_t rc = NVML_ERROR_INVALID_ARGUMENT;

	if (init_count == 0)
		return NVML_ERROR_UNINITIALIZED;
	n = list_gpus(names);
	if (index < n) {
		rc = copy_out(bus_id, length, names[index]);
		if (rc == NVML_SUCCESS && pci_device) {
			FILE *f;

			snprintf(path, sizeof(path), NVIDIA_PCI_DRIVER "/%s/device", names[index]);
			f = fopen(path, "r");
			*pci_device = 0;
			if (f) {
				if (fscanf(f, "%x", pci_device) != 1)
					*pci_device = 0;
				fclose(f);
			}
		}
	}
	for (i = 0; i < n; i++)
		free(names[i]);
	return rc;
}
