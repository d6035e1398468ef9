with subtest("a module that fails to load is rolled back and the switch fails"):
    rc, out = switch("uvm-fails")
    assert rc != 0, out
    assert set(versions().values()) == {OLD}, versions()
    machine.succeed("journalctl -u nvidia-persistenced --grep 'rolled back'")
    machine.succeed("test -c /dev/nvidia-uvm")
