/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Test stand-ins for NVIDIA's kernel modules (nvidia-agent's QEMU guest tests).
 *
 * Not NVIDIA code: small modules named like the real ones, with the same
 * char-device numbers and the same shape of inter-module dependencies
 * (nvidia <- nvidia-uvm, nvidia <- nvidia-modeset <- nvidia-drm -> drm), so
 * that loading them in a real kernel exercises modprobe/insmod ordering,
 * "module is in use" refusals and /sys/module/<name>/{version,parameters}.
 * The exported symbol names follow the real driver's; their signatures do not.
 */
#ifndef NV_STAND_IN_H
#define NV_STAND_IN_H

#ifndef NVIDIA_VERSION
#error "build with NVIDIA_VERSION=<driver version> (Kbuild passes -DNVIDIA_VERSION)"
#endif

#define NV_MAJOR_DEVICE_NUMBER 195
#define NV_MAX_DEVICES 16          /* /dev/nvidia0 .. /dev/nvidia15 */
#define NV_MODESET_MINOR 254       /* /dev/nvidia-modeset */
#define NV_CTL_MINOR 255           /* /dev/nvidiactl */

/* Exported by nvidia. */
int nvUvmInterfaceRegisterUvmCallbacks(const char *client);
void nvUvmInterfaceDeRegisterUvmOps(void);
int nvidia_get_rm_ops(const char *client, unsigned int *gpu_count);
void nvidia_put_rm_ops(const char *client);

/* Exported by nvidia-modeset. */
const char *nvKmsKapiGetFunctionsTable(const char *client);
void nvKmsKapiPutFunctionsTable(const char *client);

#endif
