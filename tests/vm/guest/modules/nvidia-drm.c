// SPDX-License-Identifier: GPL-2.0
/*
 * Test stand-in for NVIDIA's nvidia-drm.ko (see nv-stand-in.h). GPL: our own
 * test code. Depends on nvidia-modeset (nvKmsKapiGetFunctionsTable) and, when
 * the kernel has DRM as a module (Debian's default flavour), on the kernel's
 * own drm module (drm_format_info), so its .modinfo says
 * depends=drm,nvidia-modeset: insmod needs drm loaded from the host's module
 * tree first (modprobe drm). Kernels without DRM (Debian's cloud flavour)
 * get a module that depends on nvidia-modeset only, as NVIDIA's own
 * nvidia-drm does there (its conftest leaves DRM support out). `modeset` and
 * `fbdev` are the real module's parameter names (nvidia-drm.modeset=1).
 */
#include <linux/init.h>
#include <linux/kconfig.h>
#include <linux/module.h>
#include <linux/moduleparam.h>

#include "nv-stand-in.h"

#if IS_ENABLED(CONFIG_DRM)
#include <drm/drm_fourcc.h>

static unsigned int xrgb8888_cpp(void)
{
	const struct drm_format_info *info = drm_format_info(DRM_FORMAT_XRGB8888);

	return info ? info->cpp[0] : 0;
}
#else
static unsigned int xrgb8888_cpp(void)
{
	return 0; /* no DRM in this kernel */
}
#endif

static bool modeset;
module_param(modeset, bool, 0444);
MODULE_PARM_DESC(modeset, "enable atomic kernel modesetting (as the real module's; recorded only)");

static bool fbdev;
module_param(fbdev, bool, 0444);
MODULE_PARM_DESC(fbdev, "as the real module's; recorded only");

static int __init nv_drm_init(void)
{
	const char *kapi = nvKmsKapiGetFunctionsTable("nvidia-drm");

	pr_info("nvidia-drm: stand-in %s loaded (KAPI %s, XRGB8888 %u bytes/pixel, modeset=%d)\n",
		NVIDIA_VERSION, kapi, xrgb8888_cpp(), modeset);
	return 0;
}

static void __exit nv_drm_exit(void)
{
	nvKmsKapiPutFunctionsTable("nvidia-drm");
}

module_init(nv_drm_init);
module_exit(nv_drm_exit);
MODULE_LICENSE("GPL"); /* test stand-in, not NVIDIA's code */
MODULE_DESCRIPTION("NVIDIA DRM stand-in for nvidia-agent tests");
MODULE_VERSION(NVIDIA_VERSION);
