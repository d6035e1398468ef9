import json

with subtest("a module that fails to load is rolled back and the switch fails"):
    rc, out = switch("uvm-fails")
    assert rc != 0, out
    assert set(versions().values()) == {OLD}, versions()
    machine.succeed("journalctl -u nvidia-persistenced --grep 'rolled back'")
    machine.succeed("test -c /dev/nvidia-uvm")

with subtest("the rolled-back driver has its own firmware and its own nvidia-smi works"):
    fw = machine.succeed("cat /sys/module/firmware_class/parameters/path").strip()
    machine.succeed(f"test -e {fw}/nvidia/{OLD}/gsp_ga10x.bin")
    booted = json.loads(machine.succeed("cat /run/booted-system/etc/nvidia-kmod-swap/config.json"))
    out = machine.succeed(" ".join(booted["verify_command"]))
    assert out.split() == [OLD], out
