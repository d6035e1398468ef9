// SPDX-License-Identifier: GPL-2.0
/*
 * A GPU program as nixpkgs builds them (ollama, DCGM, a CUDA job: addDriverRunpath gives them a
 * RUNPATH of /run/opengl-driver/lib), or as a container runs them (the CDI spec's libraries on
 * LD_LIBRARY_PATH). It loads libnvidia-ml.so.1 from there, initialises NVML and prints
 *   driver <version> library <version>
 * or fails as NVML's users do: "Failed to initialize NVML: Driver/library version mismatch", exit 18.
 */
#include <stdio.h>

typedef int nvmlReturn_t;
nvmlReturn_t nvmlInit_v2(void);
nvmlReturn_t nvmlShutdown(void);
const char *nvmlErrorString(nvmlReturn_t result);
nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length);
nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length);

int main(void)
{
	char driver[80], library[80];
	nvmlReturn_t rc = nvmlInit_v2();

	nvmlSystemGetNVMLVersion(library, sizeof(library));
	if (rc != 0) {
		printf("Failed to initialize NVML: %s\n", nvmlErrorString(rc));
		printf("NVML library version: %s\n", library);
		return rc;
	}
	nvmlSystemGetDriverVersion(driver, sizeof(driver));
	printf("driver %s library %s\n", driver, library);
	nvmlShutdown();
	return 0;
}
