# Evaluations whose words a user sees on stderr, which checks.nix (a value) cannot look at:
# tests/nix-eval/run evaluates each attribute alone and reads its stderr.
#   renamed        a tree with the boot.kernel.* rename (qweered/nixpkgs kernel.nix): our module's
#                  config and units evaluate without an "Obsolete option" trace.
#   openNull       a datacenter configuration that leaves hardware.nvidia.open null: the assertions
#                  stop with our message naming hardware.nvidia.open, not nvidia.nix's `!null` error.
let
  lib = import ./lib-double.nix;
  system =
    renamed: module:
    (import ./nixpkgs-input.nix { inherit lib; }).lib.nixosSystem {
      inherit renamed;
      modules = [
        ../../nixos/module.nix
        module
        {
          nixpkgs.hostPlatform = "x86_64-linux";
          system.stateVersion = "26.05";
          services.nvidiaKmodSwap.enable = true;
          hardware.nvidia.nvidiaPersistenced = true;
        }
      ];
    };
  failedAssertions = s: map (a: a.message) (lib.filter (a: !a.assertion) s.config.assertions);
  renamedSystem = system true {
    services.xserver.videoDrivers = [ "nvidia" ];
    services.xserver.enable = true;
    hardware.nvidia.open = false;
    boot.kernel.modules = [ "nvidia_uvm" ];
  };
in
{
  renamed = {
    config = builtins.fromJSON renamedSystem.config.environment.etc."nvidia-kmod-swap/config.json".source.text;
    unit = renamedSystem.config.systemd.services.nvidia-persistenced.serviceConfig;
    triggers = map (p: p.outPath) renamedSystem.config.systemd.services.nvidia-persistenced.restartTriggers;
    assertions = failedAssertions renamedSystem;
  };
  openNull = failedAssertions (system false { hardware.nvidia.datacenter.enable = true; });
}
