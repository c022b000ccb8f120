/*
 * The few NVML entry points of the libnvidia-ml stand-in (test code, not
 * NVIDIA's): names, return codes and signatures follow nvml.h.
 */
#ifndef NVML_STAND_IN_H
#define NVML_STAND_IN_H

typedef enum {
	NVML_SUCCESS = 0,
	NVML_ERROR_UNINITIALIZED = 1,
	NVML_ERROR_INVALID_ARGUMENT = 2,
	NVML_ERROR_INSUFFICIENT_SIZE = 7,
	NVML_ERROR_DRIVER_NOT_LOADED = 9,
	NVML_ERROR_NO_PERMISSION = 4,
	NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
	NVML_ERROR_UNKNOWN = 999
} nvmlReturn_t;

#define NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE 80
#define NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE 32

nvmlReturn_t nvmlInit_v2(void);
nvmlReturn_t nvmlShutdown(void);
const char *nvmlErrorString(nvmlReturn_t result);
nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length);
nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length);
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count);
/* Stand-in only: the PCI address and device id of GPU index (bound to the nvidia driver). */
nvmlReturn_t nvmlStandInGetGpu(unsigned int index, char *bus_id, unsigned int length, unsigned int *pci_device);

#endif
