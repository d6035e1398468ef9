PIN = "/run/tmpfiles.d/00-nvidia-kmod-swap-pin.conf"


def program():
    """gpu-client started now: its RUNPATH is /run/opengl-driver/lib (addDriverRunpath)."""
    return machine.execute("gpu-client")


with subtest("a program started after a deferred switch gets the loaded driver's libraries"):
    booted_env = machine.succeed("readlink /run/opengl-driver").strip()
    rc, out = switch_while_busy("new")
    assert rc == 0, out
    assert set(versions().values()) == {OLD}, versions()
    # graphics.nix's rule in the new generation names the new environment; resetup ran it.
    assert booted_env not in machine.succeed("cat /etc/tmpfiles.d/graphics-driver.conf")
    rc, out = program()
    assert rc == 0 and out.strip() == f"driver {OLD} library {OLD}", f"{rc}: {out}"
    assert machine.succeed("readlink /run/opengl-driver").strip() == booted_env
    machine.succeed("systemd-tmpfiles --create --prefix=/run/opengl-driver")
    assert machine.succeed("readlink /run/opengl-driver").strip() == booted_env
    status = machine.succeed("nvidia-kmod-swap status")
    assert f"pinned to the loaded driver {OLD}" in status, status
    machine.succeed(f"/run/nvidia-loaded-driver/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader | grep -qx {OLD}")

with subtest("the timer's swap moves the links to the new driver"):
    machine.succeed("systemctl stop cuda-job.service")
    machine.wait_until_succeeds(f"test $(cat /sys/module/nvidia/version) = {NEW}", timeout=120)
    machine.wait_until_succeeds(f"test ! -e {PIN}", timeout=60)
    rc, out = program()
    assert rc == 0 and out.strip() == f"driver {NEW} library {NEW}", f"{rc}: {out}"

with subtest("a rolled-back swap keeps programs working"):
    rc, out = switch("base")
    assert rc == 0, out
    assert set(versions().values()) == {OLD}, versions()
    machine.succeed(f"test ! -e {PIN}")
    rc, out = switch("uvm-fails")
    assert rc != 0, "the failed swap fails the switch"
    assert set(versions().values()) == {OLD}, versions()
    rc, out = program()
    assert rc == 0 and out.strip() == f"driver {OLD} library {OLD}", f"{rc}: {out}"
    machine.succeed(f"test -e {PIN}")
