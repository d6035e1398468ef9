# Evaluates a NixOS system with the module and checks that each option reaches the helper's JSON
# config and the unit. Pure evaluation plus jq: no VM.
{
  nixpkgs,
  lib,
  pkgs,
  runCommand,
  jq,
}:

let
  fakeDriver =
    runCommand "fake-nvidia-x11-570.133.07" { } "mkdir -p $out"
    // {
      version = "570.133.07";
      bin = "/nix/store/00000000000000000000000000000000-nvidia-x11-570.133.07-bin";
      open = "/nix/store/11111111111111111111111111111111-nvidia-open-570.133.07";
    };
  system = nixpkgs.lib.nixosSystem {
    inherit (pkgs.stdenv.hostPlatform) system;
    modules = [
      ../../nixos/module.nix
      {
        services.nvidiaKmodSwap = {
          enable = true;
          nvidiaPackage = fakeDriver;
          onBusy = "stop-units";
          stopUnits = [ "ollama.service" ];
          onKernelChange = "fail";
          verify = false;
          settleTimeout = 7;
          extraModuleDirs = [ "/nix/store/22222222222222222222222222222222-gdrcopy/lib/modules/x" ];
        };
        hardware.nvidia.nvidiaPersistenced = true;
        hardware.nvidia.open = true;
        systemd.services.nvidia-persistenced.serviceConfig.ExecStart = "/bin/true";
        boot.loader.grub.enable = false;
        fileSystems."/".device = "none";
        system.stateVersion = lib.trivial.release;
      }
    ];
  };
  inherit (system) config;
  unit = config.systemd.services.nvidia-persistenced.serviceConfig;
  release = config.boot.kernelPackages.kernel.modDirVersion;
in
runCommand "nvidia-kmod-swap-module-eval" { nativeBuildInputs = [ jq ]; } ''
  json=${config.environment.etc."nvidia-kmod-swap/config.json".source}
  jq -e '
    .driver_version == "570.133.07"
    and .kernel_release == "${release}"
    and .module_dirs == ["${fakeDriver.open}/lib/modules/${release}", "/nix/store/22222222222222222222222222222222-gdrcopy/lib/modules/x"]
    and .on_busy == "stop-units" and .stop_units == ["ollama.service"]
    and .on_kernel_change == "fail" and .verify_command == null and .settle_timeout_s == 7
    and .rollback_dirs == ["/run/booted-system/kernel-modules/lib/modules/${release}"]
  ' "$json"
  [[ ${lib.escapeShellArg (lib.head unit.ExecCondition)} == +*"nvidia-kmod-swap --config $json check" ]]
  [[ ${lib.escapeShellArg (lib.head unit.ExecStartPre)} == +*"nvidia-kmod-swap --config $json swap" ]]
  touch $out
''
