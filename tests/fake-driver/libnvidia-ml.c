// SPDX-License-Identifier: GPL-2.0
/*
 * Fake libnvidia-ml (NVML), built per driver version as lib/libnvidia-ml.so.<version> with the
 * soname libnvidia-ml.so.1 (nvidia_x11's builder.sh links .so.1 to .so.<version>). nvmlInit_v2
 * performs the version handshake the real library does with the kernel module on /dev/nvidiactl:
 * a library of another version than the loaded module fails with
 * NVML_ERROR_LIB_RM_VERSION_MISMATCH, and the kernel logs "NVRM: API mismatch" (nvidia.c).
 * Return codes as NVIDIA/go-nvml gen/nvml/nvml.h declares them.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "fake_nv.h"

typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_LIB_RM_VERSION_MISMATCH 18

static int initialised;

nvmlReturn_t nvmlInit_v2(void)
{
	struct nv_fake_version_check req = { 0 };
	int fd = open("/dev/nvidiactl", O_RDWR);
	int rc;

	if (fd < 0)
		return NVML_ERROR_DRIVER_NOT_LOADED;
	snprintf(req.client_version, sizeof(req.client_version), "%s", FAKE_NV_VERSION);
	rc = ioctl(fd, NV_FAKE_IOCTL_CHECK_VERSION, &req);
	close(fd);
	if (rc != 0)
		return NVML_ERROR_LIB_RM_VERSION_MISMATCH;
	initialised = 1;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void)
{
	if (!initialised)
		return NVML_ERROR_UNINITIALIZED;
	initialised = 0;
	return NVML_SUCCESS;
}

/* The strings nvidia-smi prints after "Failed to initialize NVML: ". */
const char *nvmlErrorString(nvmlReturn_t result)
{
	switch (result) {
	case NVML_SUCCESS: return "Success";
	case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
	case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
	case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
	case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "Driver/library version mismatch";
	default: return "Unknown Error";
	}
}

static nvmlReturn_t copy_version(char *version, unsigned int length, const char *value)
{
	if (strlen(value) + 1 > length)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	strcpy(version, value);
	return NVML_SUCCESS;
}

/* After a successful handshake the kernel module's version is the library's. */
nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
	if (!initialised)
		return NVML_ERROR_UNINITIALIZED;
	return copy_version(version, length, FAKE_NV_VERSION);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
	return copy_version(version, length, FAKE_NV_VERSION);
}
