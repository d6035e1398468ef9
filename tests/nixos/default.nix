# The NixOS VM tests, one story each (the stories of tests/vm/scenarios, told with specialisations
# and switch-to-configuration instead of the Debian test bed's switch-driver).
#
# helper/package.nix `import`s this file rather than callPackage-ing it: callPackage adds
# `override` and `overrideDerivation` to any attrset it returns (lib/customisation.nix,
# makeOverridable), and `nix flake check` rejects every checks.<system>.<name> that is not a
# derivation. Each story is a derivation (testers.runNixOSTest returns config.test).
{ callPackage }:

let
  story = args: callPackage ./story.nix args;
in
{
  # The 2026 proprietary layout (modules in nvidia_x11.mod): bump, then the deploy-rs roll-back.
  swap = story {
    name = "swap";
    script = ./swap.py;
  };
  # Open kernel modules (hardware.nvidia.open = true: nvidia_x11.open).
  swap-open = story {
    name = "swap-open";
    script = ./swap.py;
    open = true;
  };
  # The pre-2026 layout: proprietary modules in nvidia_x11.bin (lib/modules/<version>/misc).
  swap-legacy-layout = story {
    name = "swap-legacy-layout";
    script = ./swap.py;
    layout = "legacy";
  };
  # A process holds the GPU: the swap is deferred, the unit skipped rather than failed.
  busy-defer = story {
    name = "busy-defer";
    script = ./busy-defer.py;
  };
  # Issue 11: a GPU unit in the same switch runs after the swap; deferred, it is skipped, and the
  # swap finishes by itself once the GPU is idle, running the GPU unit again.
  gpu-units = story {
    name = "gpu-units";
    script = ./gpu-units.py;
  };
  # Issue 23: while a swap waits (busy GPU, rolled back), programs started then get the loaded
  # driver's libraries through graphics.nix's real /run/opengl-driver rule, and the swap moves them.
  userspace = story {
    name = "userspace";
    script = ./userspace.py;
  };
  # Issue 25: a Slurm node (nixpkgs' services.slurm, controller and slurmd on the machine): a job
  # holds the GPU, the switch drains the node, no new job starts, the job ends, the timer swaps
  # and resumes the node, and the waiting job runs on the new driver.
  slurm = story {
    name = "slurm";
    script = ./slurm.py;
    extra = ./slurm-node.nix;
  };
  # A new module fails to load: rolled back to the old driver, the switch fails.
  rollback = story {
    name = "rollback";
    script = ./rollback.py;
  };
}
