# Evaluates NixOS systems that use services.nvidiaKmodSwap with the real NixOS modules, the real
# hardware.nvidia among them, and checks what reaches the helper's JSON config and the unit, for
# each way a generation gets its NVIDIA modules:
#   proprietary  hardware.nvidia.open = false: nvidia.nix puts the driver's `mod` in the module tree
#   open         hardware.nvidia.open = true: `open`
#   datacenter   hardware.nvidia.datacenter.enable with open = false (its default, null from 560
#                on, fails nvidia.nix's own assertions)
#   legacy       a pre-2026 nixpkgs: the proprietary modules in the driver's `bin` output
# Pure evaluation (the comparisons are Nix asserts); the derivation only records that it passed.
{
  nixpkgs,
  lib,
  stdenv,
  runCommand,
}:

let
  version = "595.44.01";
  # A driver shaped like nixpkgs' nvidia_x11 of 2026 (tests/nixos/fake-driver.nix says where each
  # attribute comes from); nothing here is built, only compared.
  output = name: runCommand "fake-nvidia-${name}-${version}" { } "mkdir -p $out";
  # What nvidia.nix reads of it (qweered/nixpkgs 1aec592130f9): version, useProfiles (an
  # environment.etc mkIf, forced by any read of environment.etc), bin, firmware, mod, open,
  # settings, persistenced and fabricmanager (lib.getExe: meta.mainProgram); compressFirmware =
  # false keeps udev.nix from compressing the firmware (generic.nix passthru, on every output).
  driver = output "x11" // {
    inherit version;
    useGLVND = true;
    useProfiles = true;
    compressFirmware = false;
    ibtSupport = true;
    bin = output "x11-bin";
    firmware = output "x11-firmware" // {
      compressFirmware = false;
    };
    mod = output "kernel-modules";
    open = output "open";
    settings = output "settings";
    persistenced = output "persistenced" // {
      meta.mainProgram = "nvidia-persistenced";
    };
    fabricmanager = output "fabricmanager" // {
      meta.mainProgram = "nv-fabricmanager";
    };
  };

  evaluate =
    extraModule:
    (nixpkgs.lib.nixosSystem {
      modules = [
        ../../nixos/module.nix
        extraModule
        {
          nixpkgs.hostPlatform = stdenv.hostPlatform.system;
          services.nvidiaKmodSwap.enable = true;
          hardware.nvidia.nvidiaPersistenced = true;
          boot.loader.grub.enable = false;
          fileSystems."/".device = "none";
          system.stateVersion = lib.trivial.release;
        }
      ];
    }).config;

  # The standard driver, enabled as a user does: videoDrivers = [ "nvidia" ] (the 2026 nvidia.nix
  # declares no hardware.nvidia.enable).
  standard =
    open:
    evaluate {
      services.xserver.videoDrivers = [ "nvidia" ];
      hardware.nvidia = {
        package = driver;
        inherit open;
      };
    };

  systems = {
    proprietary = {
      expected = driver.mod;
      config = standard false;
    };
    open = {
      expected = driver.open;
      config = standard true;
    };
    datacenter = {
      expected = driver.mod;
      config = evaluate {
        hardware.nvidia = {
          datacenter.enable = true;
          package = driver;
          # null (the default from 560 on) fails nvidia.nix's `!cfg.open` assertion.
          open = false;
        };
      };
    };
    legacy = {
      expected = driver.bin;
      config = evaluate {
        # What nvidia.nix did before 2026: boot.extraModulePackages = [ nvidia_x11.bin ].
        boot.extraModulePackages = [ driver.bin ];
        boot.kernelModules = [ "nvidia-uvm" ];
        services.nvidiaKmodSwap.nvidiaPackage = driver;
        systemd.services.nvidia-persistenced.serviceConfig.ExecStart = "/bin/true";
      };
    };
  };

  check =
    name:
    { expected, config }:
    let
      json = builtins.fromJSON config.environment.etc."nvidia-kmod-swap/config.json".source.text;
      release = config.boot.kernelPackages.kernel.modDirVersion;
      unit = config.systemd.services.nvidia-persistenced.serviceConfig;
      ours = lib.filter (
        a: lib.hasPrefix "services.nvidiaKmodSwap" (lib.trim a.message)
      ) config.assertions;
      problems =
        lib.optional (json.driver_version != version) "driver_version ${json.driver_version}"
        ++ lib.optional (
          json.module_dirs != [ "${config.system.modulesTree}/lib/modules/${release}" ]
        ) "module_dirs is not the generation's module tree: ${toString json.module_dirs}"
        ++ lib.optional (
          !lib.elem expected.outPath (map (p: p.outPath) config.boot.extraModulePackages)
        ) "the module tree lacks ${expected.name}"
        ++ lib.optional (lib.head json.modules != "nvidia") "modules: ${toString json.modules}"
        ++ lib.optional (
          json.rollback_dirs != [ "/run/booted-system/kernel-modules/lib/modules/${release}" ]
        ) "rollback_dirs: ${toString json.rollback_dirs}"
        ++ lib.optional (!lib.hasSuffix " check" (lib.head unit.ExecCondition)) "ExecCondition"
        ++ lib.optional (!lib.hasSuffix " swap" (lib.head unit.ExecStartPre)) "ExecStartPre"
        ++
          lib.optional (!lib.all (a: a.assertion) ours)
            "assertions: ${toString (map (a: a.message) (lib.filter (a: !a.assertion) ours))}";
    in
    lib.optional (problems != [ ]) "${name}: ${lib.concatStringsSep "; " problems}";

  failures = lib.concatLists (lib.mapAttrsToList check systems);
in
assert lib.assertMsg (failures == [ ]) (lib.concatStringsSep "\n" failures);
runCommand "nvidia-kmod-swap-module-eval" { } ''
  echo "module evaluated for: ${lib.concatStringsSep ", " (lib.attrNames systems)}" > $out
''
