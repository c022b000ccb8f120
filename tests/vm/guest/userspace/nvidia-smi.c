/*
 * nvidia-smi stand-in for nvidia-agent's QEMU guest tests (test code, not
 * NVIDIA's). Dynamically linked against libnvidia-ml.so.1, found by the
 * dynamic linker (ld.so.cache / LD_LIBRARY_PATH), like the real program.
 *
 *   nvidia-smi            header with "Driver Version: <version>" and the GPUs
 *   nvidia-smi -L         "GPU <i>: ... (PCI <address>)" per GPU
 *   nvidia-smi --query-gpu=driver_version --format=csv,noheader
 *                         the driver version once per GPU
 *
 * Exit status is NVML's return code, as the real nvidia-smi's: 0 on success,
 * 9 when the driver is not loaded, 18 on a driver/library version mismatch.
 */
#include <stdio.h>
#include <string.h>

#include "nvml-stand-in.h"

static const char *gpu_name(unsigned int device)
{
	switch (device) {
	case 0x2330: return "NVIDIA H100 80GB HBM3";
	case 0x2204: return "NVIDIA GeForce RTX 3090";
	default: return "NVIDIA Graphics Device";
	}
}

static int fail(nvmlReturn_t rc)
{
	if (rc == NVML_ERROR_DRIVER_NOT_LOADED)
		printf("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
		       "Make sure that the latest NVIDIA driver is installed and running.\n\n");
	else
		printf("Failed to initialize NVML: %s\n", nvmlErrorString(rc));
	return (int)rc;
}

int main(int argc, char **argv)
{
	char driver[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE], nvml[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];
	char bus_id[NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
	unsigned int count = 0, i, device;
	int list = 0, query_version = 0;
	nvmlReturn_t rc;

	for (i = 1; i < (unsigned int)argc; i++) {
		if (!strcmp(argv[i], "-L") || !strcmp(argv[i], "--list-gpus"))
			list = 1;
		else if (!strcmp(argv[i], "--query-gpu=driver_version"))
			query_version = 1;
		else if (!strncmp(argv[i], "--format=", 9))
			continue;
		else {
			fprintf(stderr, "nvidia-smi (stand-in): unsupported argument %s\n", argv[i]);
			return 2;
		}
	}
	rc = nvmlInit_v2();
	if (rc != NVML_SUCCESS)
		return fail(rc);
	rc = nvmlSystemGetDriverVersion(driver, sizeof(driver));
	if (rc == NVML_SUCCESS)
		rc = nvmlSystemGetNVMLVersion(nvml, sizeof(nvml));
	if (rc == NVML_SUCCESS)
		rc = nvmlDeviceGetCount_v2(&count);
	if (rc != NVML_SUCCESS) {
		nvmlShutdown();
		return fail(rc);
	}
	if (!list && !query_version)
		printf("NVIDIA-SMI %s    Driver Version: %s    CUDA Version: 12.2\n"
		       "NVML Version: %s\nAttached GPUs: %u\n", driver, driver, nvml, count);
	for (i = 0; i < count; i++) {
		if (nvmlStandInGetGpu(i, bus_id, sizeof(bus_id), &device) != NVML_SUCCESS)
			continue;
		if (query_version)
			printf("%s\n", driver);
		else
			printf("GPU %u: %s (PCI %s)\n", i, gpu_name(device), bus_id);
	}
	nvmlShutdown();
	return 0;
}
