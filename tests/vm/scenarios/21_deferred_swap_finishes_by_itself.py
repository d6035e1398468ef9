"""Issue 11 §7: while a swap is deferred, every new NVIDIA client fails on the version mismatch, so
deferral must end by itself. Busy -> deferred (units skipped) -> the job holding the GPU ends ->
within a bounded time the swap happens with nobody restarting a unit: persistenced runs on the new
driver and the GPU units ran again."""

import time

BOOT = {"driver": "old", "gpu_units": True, "retry_timer": True}
UNITS = ["gpu-cdi-generator.service", "gpu-power-limit.service"]


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    bed.hold_gpu()
    bed.switch_driver("new")
    rc, out = machine.execute("systemctl restart nvidia-persistenced.service " + " ".join(UNITS), timeout=180)
    assert rc == 0, out
    assert bed.unit_state() == "inactive" and machine.module_version("nvidia") == old
    # A deferral is not "the old driver keeps serving": a new client of the new driver fails.
    rc, _ = machine.execute(f"{bed.packages['new']['path']}/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    assert rc == 18
    status = machine.succeed("nvidia-kmod-swap status")
    assert f"pending: upgrade to {new}" in status and "deferred since:" in status, status
    assert "cuda-job.service" in status and "runs by itself once the GPU is idle" in status, status
    # The ticks of the retry timer while the job runs change nothing.
    time.sleep(5)
    assert machine.module_version("nvidia") == old and bed.unit_state() == "inactive"

    machine.succeed("systemctl stop cuda-job.service")  # the batch job ends; nobody touches our units
    stopped = time.monotonic()
    try:
        machine.wait_until_succeeds(f"test \"$(cat /sys/module/nvidia/version)\" = {new}", timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\nretry unit:\n{machine.journal('-u nvidia-kmod-swap-retry -n 40')}\n"
                             f"persistenced:\n{machine.journal('-u nvidia-persistenced -n 40')}") from None
    machine.wait_for_unit("nvidia-persistenced.service", timeout=60)
    took = time.monotonic() - stopped
    versions = machine.driver_versions()
    assert all(versions[m] == new for m in ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")), versions
    for unit in UNITS:  # the GPU units, skipped while deferred, ran again on the new driver
        machine.wait_for_unit(unit, timeout=60)
        assert machine.succeed(f"cat /run/{unit.removesuffix('.service')}.out").strip() == new, unit
    journal = machine.journal("-u nvidia-kmod-swap-retry.service")
    assert "the GPU is idle: finishing the swap" in journal, journal
    machine.succeed("test ! -e /run/nvidia-kmod-swap/deferred.json")
    status = machine.succeed("nvidia-kmod-swap status")
    assert "deferred since" not in status and "pending" not in status, status
    print(f"    deferred swap finished {took:.0f}s after the GPU went idle")
