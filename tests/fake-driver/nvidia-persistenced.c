// SPDX-License-Identifier: GPL-2.0
/*
 * Fake nvidia-persistenced. Like the real daemon it is started by systemd as Type=forking,
 * checks its (compiled-in) version against the kernel module through /dev/nvidiactl, and
 * keeps every /dev/nvidia<N> open while it runs, which pins the kernel module.
 * On a version mismatch it fails with the real messages, in the parent, before forking.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>
#include "fake_nv.h"

#define PIDDIR "/var/run/nvidia-persistenced"
#define PIDFILE PIDDIR "/nvidia-persistenced.pid"

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static int check_version(int fd)
{
	struct nv_fake_version_check req = { 0 };

	snprintf(req.client_version, sizeof(req.client_version), "%s", FAKE_NV_VERSION);
	return ioctl(fd, NV_FAKE_IOCTL_CHECK_VERSION, &req);
}

/* Reads the rest of the pipe before closing it, so the reader doesn't die of SIGPIPE. */
static void drain_close(FILE *p)
{
	if (!p)
		return;
	while (fgetc(p) != EOF)
		;
	pclose(p);
}

/* Opens nvidiactl and every GPU minor listed in /proc/driver/nvidia/gpus; -1 on any failure. */
static int open_devices(int *fds, int max)
{
	int n = 0, minor;
	char path[64];
	FILE *p = popen("cat /proc/driver/nvidia/gpus/*/information 2>/dev/null | sed -n 's/^Device Minor:[ \t]*//p'", "r");

	fds[n] = open("/dev/nvidiactl", O_RDWR);
	if (fds[n] < 0 || check_version(fds[n]) != 0) {
		drain_close(p);
		return -1;
	}
	n++;
	while (p && n < max && fscanf(p, "%d", &minor) == 1) {
		snprintf(path, sizeof(path), "/dev/nvidia%d", minor);
		fds[n] = open(path, O_RDWR);
		if (fds[n] < 0 || check_version(fds[n]) != 0) {
			drain_close(p);
			return -1;
		}
		n++;
	}
	drain_close(p);
	return n > 1 ? n : -1;
}

int main(int argc, char **argv)
{
	int fds[40], n, verbose = 0, pipefd[2];
	char ok;
	pid_t pid;
	FILE *f;

	for (int i = 1; i < argc; i++)
		if (!strcmp(argv[i], "--verbose") || !strcmp(argv[i], "-V"))
			verbose = 1;
		else if (!strcmp(argv[i], "--version")) {
			printf("nvidia-persistenced:  version %s\n", FAKE_NV_VERSION);
			return 0;
		}
	openlog("nvidia-persistenced", LOG_PID, LOG_DAEMON);
	if (pipe(pipefd) != 0)
		return 1;
	pid = fork();
	if (pid < 0)
		return 1;
	if (pid > 0) {
		/* Parent: like the real one, wait for the daemon to report its initialization. */
		close(pipefd[1]);
		if (read(pipefd[0], &ok, 1) != 1 || ok != 1) {
			fprintf(stderr, "nvidia-persistenced failed to initialize. Check syslog for more details.\n");
			return 1;
		}
		return 0;
	}
	close(pipefd[0]);
	setsid();
	if (verbose)
		syslog(LOG_INFO, "Verbose syslog connection opened");
	syslog(LOG_INFO, "Started (%d)", getpid());
	n = open_devices(fds, 40);
	if (n < 0) {
		syslog(LOG_ERR, "Failed to query NVIDIA devices. Please ensure that the NVIDIA device files (/dev/nvidia*) exist, and that user 0 has read and write permissions for those files.");
		syslog(LOG_INFO, "Shutdown (%d)", getpid());
		ok = 0;
		if (write(pipefd[1], &ok, 1) < 0) { /* parent reports the failure */ }
		return 1;
	}
	mkdir(PIDDIR, 0755);
	f = fopen(PIDFILE, "w");
	if (f) {
		fprintf(f, "%d\n", getpid());
		fclose(f);
	}
	signal(SIGTERM, on_term);
	signal(SIGINT, on_term);
	ok = 1;
	if (write(pipefd[1], &ok, 1) < 0)
		return 1;
	close(pipefd[1]);
	if (verbose)
		syslog(LOG_INFO, "device 0000:01:00.0 - persistence mode enabled (%d devices)", n - 1);
	while (!stop)
		pause();
	unlink(PIDFILE);
	syslog(LOG_INFO, "Shutdown (%d)", getpid());
	return 0;
}
