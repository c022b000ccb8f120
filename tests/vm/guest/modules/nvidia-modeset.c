// SPDX-License-Identifier: GPL-2.0
/*
 * Test stand-in for NVIDIA's nvidia-modeset.ko (see nv-stand-in.h). GPL: our
 * own test code. Uses nvidia_get_rm_ops() from nvidia (depends=nvidia) and
 * exports nvKmsKapiGetFunctionsTable() for nvidia-drm. /dev/nvidia-modeset is
 * minor 254 of nvidia's major 195, served by nvidia as in the real driver.
 */
#include <linux/atomic.h>
#include <linux/init.h>
#include <linux/module.h>

#include "nv-stand-in.h"

static atomic_t kapi_clients = ATOMIC_INIT(0);
static unsigned int gpus_seen;

const char *nvKmsKapiGetFunctionsTable(const char *client)
{
	atomic_inc(&kapi_clients);
	pr_info("nvidia-modeset: %s took the KAPI table\n", client);
	return NVIDIA_VERSION;
}
EXPORT_SYMBOL_GPL(nvKmsKapiGetFunctionsTable);

void nvKmsKapiPutFunctionsTable(const char *client)
{
	atomic_dec(&kapi_clients);
}
EXPORT_SYMBOL_GPL(nvKmsKapiPutFunctionsTable);

static int __init nvkms_init(void)
{
	int rc = nvidia_get_rm_ops("nvidia-modeset", &gpus_seen);

	if (rc)
		return rc;
	pr_info("nvidia-modeset: stand-in %s loaded (%u GPUs)\n", NVIDIA_VERSION, gpus_seen);
	return 0;
}

static void __exit nvkms_exit(void)
{
	nvidia_put_rm_ops("nvidia-modeset");
}

module_init(nvkms_init);
module_exit(nvkms_exit);
MODULE_LICENSE("GPL"); /* test stand-in, not NVIDIA's code */
MODULE_DESCRIPTION("NVIDIA modeset stand-in for nvidia-agent tests");
MODULE_VERSION(NVIDIA_VERSION);
