# A TEST DOUBLE of the NixOS modules services.nvidiaKmodSwap meets, as lists of modules for
# modules-double.nix. Option types and defaults, and the config these modules contribute, are
# taken from the nixpkgs files named beside them (NixOS/nixpkgs, 2025-2026 versions; where a file
# changed in 2026 both versions are here, chosen by `era`). Options we never touch are left out,
# so defining one of those fails here although NixOS would accept it.
{
  # "2026": nvidia.nix installs `nvidia_x11.mod` (nixpkgs PR 498612, May 2026);
  # "2025": nvidia.nix installs `nvidia_x11.bin`, where the proprietary modules lived before.
  era ? "2026",
}:
[
  # nixos/modules/system/boot/kernel.nix
  (
    {
      config,
      lib,
      pkgs,
      ...
    }:
    let
      # kernel.nix attrNamesToTrue: a list of names or an attrset of booleans; apply -> the names.
      attrNamesToTrue = lib.types.coercedTo (lib.types.listOf lib.types.str) (
        names: lib.genAttrs names (_: true)
      ) (lib.types.attrsOf lib.types.bool);
    in
    {
      options = {
        boot.kernelPackages = lib.mkOption {
          type = lib.types.raw;
          default = pkgs.linuxPackages;
        };
        boot.kernelModules = lib.mkOption {
          type = attrNamesToTrue;
          default = { };
          apply = mods: lib.attrNames (lib.filterAttrs (_: v: v) mods);
        };
        boot.extraModulePackages = lib.mkOption {
          type = lib.types.listOf lib.types.package;
          default = [ ];
        };
        boot.kernelParams = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
        };
        # internal; "Convert the list of path to only one path": aggregateModules (a buildEnv).
        system.modulesTree = lib.mkOption {
          type = lib.types.listOf lib.types.path;
          default = [ ];
          apply = modules: pkgs.aggregateModules modules;
        };
      };
      config = {
        boot.kernelModules = [
          "loop"
          "atkbd"
        ];
        # 2026: `[ (lib.getOutput "modules" kernel) ] ++ ...`; before: `[ kernel ] ++ ...`.
        system.modulesTree = [
          (lib.getOutput "modules" config.boot.kernelPackages.kernel)
        ]
        ++ config.boot.extraModulePackages;
      };
    }
  )

  # nixos/modules/hardware/video/nvidia.nix (the parts that decide the module tree, the modules
  # loaded at boot and the nvidia-persistenced unit)
  (
    {
      config,
      lib,
      pkgs,
      ...
    }:
    let
      cfg = config.hardware.nvidia;
      # The 2024 file enables the driver by services.xserver.videoDrivers = [ "nvidia" ] (or
      # datacenter.enable); the 2025-2026 option block (seen only in a fork derived from it, not in
      # a nixpkgs copy) adds hardware.nvidia.enable. Both enable it here.
      nvidiaEnabled =
        cfg.enable || cfg.datacenter.enable || lib.elem "nvidia" config.services.xserver.videoDrivers;
      nvidiaPkg = if nvidiaEnabled then cfg.package else null;
      useOpenModules = cfg.open == true;
      persistenced = lib.mkIf cfg.nvidiaPersistenced {
        description = "NVIDIA Persistence Daemon";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Type = "forking";
          Restart = "always";
          PIDFile = "/var/run/nvidia-persistenced/nvidia-persistenced.pid";
          ExecStart = "${lib.getExe nvidiaPkg.persistenced} --verbose";
          ExecStopPost = "${pkgs.coreutils}/bin/rm -rf /var/run/nvidia-persistenced";
        };
      };
    in
    {
      options.hardware.nvidia = {
        enabled = lib.mkOption {
          readOnly = true;
          type = lib.types.bool;
          default = nvidiaPkg != null;
        };
        enable = lib.mkEnableOption "NVIDIA driver support";
        datacenter.enable = lib.mkEnableOption "Data Center drivers (NVLink topology)";
        modesetting.enable = lib.mkEnableOption "kernel modesetting" // {
          default = lib.versionAtLeast cfg.package.version "535";
        };
        nvidiaPersistenced = lib.mkEnableOption "nvidia-persistenced";
        dynamicBoost.enable = lib.mkEnableOption "dynamic Boost balancing (nvidia-powerd)";
        package = lib.mkOption {
          type = lib.types.raw;
          default =
            let
              flavour = if cfg.datacenter.enable then "dc" else "stable";
            in
            config.boot.kernelPackages.nvidiaPackages.${flavour};
        };
        open = lib.mkOption {
          type = lib.types.nullOr lib.types.bool;
          default = if lib.versionOlder nvidiaPkg.version "560" then false else null;
        };
      };
      config = lib.mkIf cfg.enabled (
        lib.mkMerge [
          {
            boot.extraModulePackages =
              if useOpenModules then
                [ nvidiaPkg.open ]
              else if era == "2026" then
                [ nvidiaPkg.mod ]
              else
                [ nvidiaPkg.bin ];
            boot.kernelModules = lib.optionals useOpenModules [ "nvidia_uvm" ];
            # hardware.firmware = lib.optional cfg.open nvidia_x11.firmware;
            hardware.firmware = lib.optional useOpenModules nvidiaPkg.firmware;
            systemd.services.nvidia-persistenced = persistenced;
          }
          # (lib.mkIf cfg.dynamicBoost.enable { "nvidia-powerd" = { ... Type = "dbus"; BusName =
          # "nvidia.powerd.server"; ExecStart = "${nvidia_x11.bin}/bin/nvidia-powerd"; ... } })
          (lib.mkIf cfg.dynamicBoost.enable {
            systemd.services.nvidia-powerd = {
              description = "nvidia-powerd service";
              wantedBy = [ "multi-user.target" ];
              serviceConfig = {
                Type = "dbus";
                BusName = "nvidia.powerd.server";
                ExecStart = "${nvidiaPkg.bin}/bin/nvidia-powerd";
              };
            };
          })
          # (lib.mkIf cfg.datacenter.enable { systemd.services.nvidia-fabricmanager = {
          # unitConfig.After / Requires = [ "network-online.target" ]; serviceConfig = { Type =
          # "forking"; TimeoutStartSec = 240; ExecStart = ... nv-fabricmanager -c ...; }; } })
          (lib.mkIf cfg.datacenter.enable {
            systemd.services.nvidia-fabricmanager = {
              wantedBy = [ "multi-user.target" ];
              unitConfig.After = [ "network-online.target" ];
              unitConfig.Requires = [ "network-online.target" ];
              serviceConfig = {
                Type = "forking";
                TimeoutStartSec = 240;
                ExecStart = "${nvidiaPkg.outPath}-fabricmanager/bin/nv-fabricmanager -c /etc/fabricmanager.cfg";
              };
            };
          })
          (lib.mkIf (!cfg.datacenter.enable) {
            boot.kernelModules = [
              "nvidia"
              "nvidia_modeset"
              "nvidia_drm"
            ];
          })
        ]
      );
    }
  )

  # nixos/modules/services/hardware/nvidia-container-toolkit/default.nix (NixOS/nixpkgs a808f823):
  # systemd.services.nvidia-container-toolkit-cdi-generator = lib.mkIf ...enable { wantedBy =
  # [ "multi-user.target" ]; serviceConfig = { RuntimeDirectory = "cdi"; RemainAfterExit = true;
  # ExecStart = ...; Type = "oneshot"; }; }
  (
    { config, lib, ... }:
    {
      options.hardware.nvidia-container-toolkit.enable = lib.mkEnableOption "the NVIDIA container toolkit";
      config = lib.mkIf config.hardware.nvidia-container-toolkit.enable {
        systemd.services.nvidia-container-toolkit-cdi-generator = {
          description = "Container Device Interface (CDI) for Nvidia generator";
          wantedBy = [ "multi-user.target" ];
          serviceConfig = {
            RuntimeDirectory = "cdi";
            RemainAfterExit = true;
            ExecStart = "/nix/store/cccccccccccccccccccccccccccccccc-nvidia-cdi-generator/bin/nvidia-cdi-generator";
            Type = "oneshot";
          };
        };
      };
    }
  )

  # The rest of NixOS we define into or read.
  (
    { lib, pkgs, ... }:
    let
      # nixos/lib/systemd-unit-options.nix unitOption: list definitions concatenate (in mkOrder
      # order), others must be equal.
      unitOption = lib.mkOptionType {
        name = "systemd option";
        merge =
          loc: defs:
          if lib.any (def: lib.isList def.value) defs then
            lib.concatLists (map (def: lib.toList def.value) defs)
          else
            lib.mergeEqualOption loc defs;
      };
      # nixos/lib/systemd-unit-options.nix / systemd.nix: a service is a submodule; the options of
      # it we use, with their types. Another name is an error, as the submodule would make it.
      serviceOptions = with lib.types; {
        description = str;
        wantedBy = listOf str;
        after = listOf str;
        requires = listOf str;
        path = listOf package;
        restartTriggers = listOf unspecified;
        serviceConfig = attrsOf unitOption;
        unitConfig = attrsOf unitOption;
      };
      # systemd.timers.<name>: the options of it we use (nixos/lib/systemd-unit-options.nix).
      timerOptions = with lib.types; {
        wantedBy = listOf str;
        timerConfig = attrsOf unitOption;
      };
      unitType =
        typeName: unitOptions:
        lib.mkOptionType {
          name = typeName;
          check = builtins.isAttrs;
          merge =
            loc: defs:
            let
              names = lib.unique (lib.concatLists (map (d: builtins.attrNames d.value) defs));
              field =
                n:
                if unitOptions ? ${n} then
                  lib.modules.mergeDefinitions (loc ++ [ n ]) unitOptions.${n} (
                    map (d: d // { value = d.value.${n}; }) (lib.filter (d: d.value ? ${n}) defs)
                  )
                else
                  throw "The option `${lib.showOption (loc ++ [ n ])}' does not exist.";
            in
            lib.genAttrs (lib.filter (n: (field n).optionalValue ? value) names) (n: (field n).mergedValue);
        };
      service = unitType "systemd service" serviceOptions;
      timer = unitType "systemd timer" timerOptions;
    in
    {
      options = {
        assertions = lib.mkOption {
          type = lib.types.listOf lib.types.anything;
          default = [ ];
        };
        environment.etc = lib.mkOption {
          type = lib.types.attrsOf lib.types.anything;
          default = { };
        };
        environment.systemPackages = lib.mkOption {
          type = lib.types.listOf lib.types.package;
          default = [ ];
        };
        systemd.services = lib.mkOption {
          type = lib.types.attrsOf service;
          default = { };
        };
        systemd.timers = lib.mkOption {
          type = lib.types.attrsOf timer;
          default = { };
        };
        services.xserver.videoDrivers = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
        };
        services.udev.extraRules = lib.mkOption {
          type = lib.types.lines;
          default = "";
        };
        # nixos/modules/services/hardware/udev.nix (NixOS/nixpkgs 01f19f54): a list of packages,
        # apply = list: pkgs.buildEnv { name = "firmware"; paths = list; pathsToLink =
        # [ "/lib/firmware" ]; ignoreCollisions = true; }; activation then writes
        # "${config.hardware.firmware}/lib/firmware" to /sys/module/firmware_class/parameters/path.
        hardware.firmware = lib.mkOption {
          type = lib.types.listOf lib.types.package;
          default = [ ];
          apply =
            list:
            pkgs.buildEnv {
              name = "firmware";
              paths = list;
              pathsToLink = [ "/lib/firmware" ];
              ignoreCollisions = true;
            };
        };
        # specialisation.<name>.configuration is a deferredModule: kept as written, evaluated later.
        specialisation = lib.mkOption {
          type = lib.types.attrsOf lib.types.raw;
          default = { };
        };
        fileSystems = lib.mkOption {
          type = lib.types.attrsOf lib.types.anything;
          default = { };
        };
        boot.loader.grub.enable = lib.mkOption {
          type = lib.types.bool;
          default = true;
        };
        system.stateVersion = lib.mkOption { type = lib.types.str; };
        nixpkgs.hostPlatform = lib.mkOption { type = lib.types.anything; };
      };
    }
  )
]
