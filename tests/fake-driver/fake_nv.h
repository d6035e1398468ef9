/* SPDX-License-Identifier: GPL-2.0 */
/* Shared between the fake kernel modules and the fake userspace (nvidia-persistenced, nvidia-smi). */
#ifndef FAKE_NV_H
#define FAKE_NV_H

#ifdef __KERNEL__
#include <linux/ioctl.h>
#include <linux/types.h>
#else
#include <sys/ioctl.h>
#include <stdint.h>
typedef uint32_t __u32;
#endif

#define NV_MAJOR 195
#define NV_CTL_MINOR 255
#define NV_MODESET_MINOR 254

/* Like the real driver's version check: the client sends its version string. */
struct nv_fake_version_check {
	__u32 cmd;
	__u32 reply;
	char client_version[64];
};
#define NV_FAKE_IOCTL_CHECK_VERSION _IOWR('F', 0xd2, struct nv_fake_version_check)

#ifdef __KERNEL__
const char *nv_fake_version(void);
int nv_fake_gpu_count(void);
int nv_fake_modeset_ready(void);
#endif

#endif
