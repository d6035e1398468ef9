"""Issue 22: a deferred swap that cannot run once the GPU is idle (here: the generation's verify
command is missing, so the swap unit's run refuses) is tried once and the deferral dropped, said
once in the journal; the retry timer does not start the swap unit every tick until reboot. (On
0c4fa7d: the timer started the unit on every tick.)"""

import time

BOOT = {"driver": "old", "retry_timer": True}


def test(machine, bed):
    old = bed.packages["old"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    bed.hold_gpu()
    bed.switch_driver("new", config={"verify_command": ["/nix/store/missing-nvidia-x11-bin/bin/nvidia-smi"]})
    assert bed.restart_persistenced() == 0
    assert bed.unit_state() == "inactive" and machine.module_version("nvidia") == old
    machine.succeed("test -e /run/nvidia-kmod-swap/deferred.json")
    machine.succeed("systemctl stop cuda-job.service")
    machine.wait_until_succeeds("test ! -e /run/nvidia-kmod-swap/deferred.json", timeout=60)
    time.sleep(12)  # six ticks of the 2 s timer
    retries = machine.succeed("journalctl -u nvidia-kmod-swap-retry.service --no-pager -o cat | "
                              "grep -c 'the GPU is idle: finishing the swap' || true").strip()
    assert retries == "1", f"the swap unit was started {retries} times by the timer"
    journal = machine.journal("-u nvidia-kmod-swap-retry.service")
    assert journal.count("the timer stops retrying it") == 1, journal
    # Why, in the swap unit's own journal. (Its Restart=always then restarts it a few times, up
    # to systemd's start limit: systemd's doing, not the timer's.)
    assert "refused: the verify command" in machine.journal("-u nvidia-persistenced.service")
    assert machine.module_version("nvidia") == old  # never touched: refused before unloading
