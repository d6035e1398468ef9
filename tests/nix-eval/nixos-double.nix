# A TEST DOUBLE of the NixOS modules services.nvidiaKmodSwap meets, as lists of modules for
# modules-double.nix. Option types and defaults, and the config these modules contribute, are
# taken from the nixpkgs files named beside them (NixOS/nixpkgs, 2025-2026 versions; where a file
# changed in 2026 both versions are here, chosen by `era`). Options we never touch are left out,
# so defining one of those fails here although NixOS would accept it.
{
  # "2026": nvidia.nix installs `nvidia_x11.mod` (nixpkgs PR 498612, May 2026);
  # "2025": nvidia.nix installs `nvidia_x11.bin`, where the proprietary modules lived before.
  era ? "2026",
  # The boot.kernel.* option rename of some 2026 trees (qweered/nixpkgs kernel.nix).
  renamed ? false,
}:
[
  # nixos/modules/system/boot/kernel.nix and modprobe.nix. renamed: as in qweered/nixpkgs
  # 1aec592130f9 (kernel.nix; modprobe.nix 595607534a11), the options live under boot.kernel and
  # the old names are mkRenamedOptionModule aliases (reading one prints "Obsolete option ...").
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
      modulesOption = lib.mkOption {
        type = attrNamesToTrue;
        default = { };
        apply = mods: lib.attrNames (lib.filterAttrs (_: v: v) mods);
      };
      kernelOptions = {
        packages = lib.mkOption {
          type = lib.types.raw;
          default = pkgs.linuxPackages;
        };
        modules = modulesOption;
        blacklistedModules = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
        };
        extraModulePackages = lib.mkOption {
          type = lib.types.listOf lib.types.package;
          default = [ ];
        };
        params = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
        };
      };
      k = if renamed then config.boot.kernel else {
        packages = config.boot.kernelPackages;
        inherit (config.boot) extraModulePackages;
      };
    in
    {
      imports = lib.optionals renamed [
        (lib.mkRenamedOptionModule
          [
            "boot"
            "kernelPackages"
          ]
          [
            "boot"
            "kernel"
            "packages"
          ]
        )
        (lib.mkRenamedOptionModule
          [
            "boot"
            "kernelParams"
          ]
          [
            "boot"
            "kernel"
            "params"
          ]
        )
        (lib.mkRenamedOptionModule
          [
            "boot"
            "kernelModules"
          ]
          [
            "boot"
            "kernel"
            "modules"
          ]
        )
        (lib.mkRenamedOptionModule
          [
            "boot"
            "extraModulePackages"
          ]
          [
            "boot"
            "kernel"
            "extraModulePackages"
          ]
        )
        (lib.mkRenamedOptionModule
          [
            "boot"
            "blacklistedKernelModules"
          ]
          [
            "boot"
            "kernel"
            "blacklistedModules"
          ]
        )
      ];
      options = {
        # internal; "Convert the list of path to only one path": aggregateModules (a buildEnv).
        system.modulesTree = lib.mkOption {
          type = lib.types.listOf lib.types.path;
          default = [ ];
          apply = modules: pkgs.aggregateModules modules;
        };
        boot.extraModprobeConfig = lib.mkOption {
          type = lib.types.lines;
          default = "";
        };
      }
      // (
        if renamed then
          { boot.kernel = kernelOptions; }
        else
          {
            boot = {
              kernelPackages = kernelOptions.packages;
              kernelModules = modulesOption;
              blacklistedKernelModules = kernelOptions.blacklistedModules;
              extraModulePackages = kernelOptions.extraModulePackages;
              kernelParams = kernelOptions.params;
            };
          }
      );
      config = {
        boot =
          let
            modules = [
              "loop"
              "atkbd"
            ];
          in
          if renamed then { kernel = { inherit modules; }; } else { kernelModules = modules; };
        # 2026: `[ (lib.getOutput "modules" kernel) ] ++ ...`; before: `[ kernel ] ++ ...`.
        system.modulesTree = [
          (lib.getOutput "modules" k.packages.kernel)
        ]
        ++ k.extraModulePackages;
      };
    }
  )

  # nixos/modules/hardware/video/nvidia.nix, as of qweered/nixpkgs 1aec592130f9 (a 2026 fork; its
  # Common, X11 and Data Center blocks). Everything it forces when our module reads the config is
  # here: the environment.etc entries (reading any key forces every mkIf in that attrsOf, among
  # them nvidia_x11.useProfiles), the assertions (among them `!cfg.open`, an error on null), the
  # module packages, the boot modules, the units and hardware.graphics' driver packages (what
  # /run/opengl-driver links). Left out: PRIME, power management, the X server's driver entry.
  # era "2025": the file before nixpkgs PR 498612 (extraModulePackages = [ nvidia_x11.bin ]).
  (
    {
      config,
      lib,
      pkgs,
      ...
    }:
    let
      cfg = config.hardware.nvidia;
      nvidiaEnabled = lib.elem "nvidia" config.services.xserver.videoDrivers;
      nvidia_x11 = if cfg.enabled then cfg.package else null;
      useOpenModules = cfg.open == true;
      # kernel.nix of the same tree: boot.kernel.* where the rename is there, boot.* before.
      boot =
        attrs:
        if renamed then { boot.kernel = removeAttrs attrs [ "old" ]; } else { boot = attrs.old; };
      modulePackages =
        if useOpenModules then
          [ nvidia_x11.open ]
        else if era == "2026" then
          [ nvidia_x11.mod ]
        else
          [ nvidia_x11.bin ];
      persistenced = lib.mkIf cfg.nvidiaPersistenced {
        description = "NVIDIA Persistence Daemon";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Type = "forking";
          Restart = "always";
          PIDFile = "/var/run/nvidia-persistenced/nvidia-persistenced.pid";
          ExecStart = "${lib.getExe nvidia_x11.persistenced} --verbose";
          ExecStopPost = "${pkgs.coreutils}/bin/rm -rf /var/run/nvidia-persistenced";
        };
      };
      extraModulePackages = modulePackages;
    in
    {
      options.hardware.nvidia = {
        # readOnly; "default = nvidiaEnabled || cfg.datacenter.enable". There is no
        # hardware.nvidia.enable in the 2026 file.
        enabled = lib.mkOption {
          readOnly = true;
          type = lib.types.bool;
          default = nvidiaEnabled || cfg.datacenter.enable;
        };
        datacenter.enable = lib.mkEnableOption "Data Center drivers for NVIDIA cards on a NVLink topology";
        modesetting.enable = lib.mkEnableOption "kernel modesetting" // {
          default = lib.versionAtLeast cfg.package.version "535";
        };
        nvidiaPersistenced = lib.mkEnableOption "nvidia-persistenced";
        nvidiaSettings = lib.mkEnableOption "nvidia-settings" // {
          default = true;
        };
        dynamicBoost.enable = lib.mkEnableOption "dynamic Boost balancing (nvidia-powerd)";
        gsp.enable = lib.mkEnableOption "the GPU System Processor" // {
          default = useOpenModules || lib.versionAtLeast nvidia_x11.version "555";
        };
        package = lib.mkOption {
          type = lib.types.raw;
          default =
            let
              flavour = if cfg.datacenter.enable then "dc" else "stable";
            in
            (if renamed then config.boot.kernel.packages else config.boot.kernelPackages)
            .nvidiaPackages.${flavour};
        };
        open = lib.mkOption {
          type = lib.types.nullOr lib.types.bool;
          default = if lib.versionOlder nvidia_x11.version "560" then false else null;
        };
      };
      config = lib.mkIf cfg.enabled (
        lib.mkMerge [
          # Common
          {
            assertions = [
              {
                assertion = !(nvidiaEnabled && cfg.datacenter.enable);
                message = "You cannot configure both X11 and Data Center drivers at the same time.";
              }
              {
                assertion = cfg.open != null || cfg.datacenter.enable;
                message = "You must configure `hardware.nvidia.open` on NVIDIA driver versions >= 560.";
              }
              {
                # `!null` is an evaluation error: a datacenter configuration with open = null stops here.
                assertion = !cfg.open || (nvidia_x11.open != null);
                message = "The selected NVIDIA package does not provide open kernel modules.";
              }
            ];
            services.udev.extraRules = ''
              KERNEL=="nvidia", RUN+="${pkgs.runtimeShell} -c 'mknod -m 666 /dev/nvidiactl c 195 255'"
            '';
            environment.systemPackages = [ nvidia_x11.bin ];
          }
          (boot {
            blacklistedModules = [
              "nouveau"
              "nova_core"
              "nvidiafb"
            ];
            modules = lib.optionals useOpenModules [ "nvidia_uvm" ];
            old = {
              blacklistedKernelModules = [
                "nouveau"
                "nova_core"
                "nvidiafb"
              ];
              kernelModules = lib.optionals useOpenModules [ "nvidia_uvm" ];
            };
          })
          # X11
          (lib.mkIf nvidiaEnabled (
            lib.mkMerge [
              (boot {
                inherit extraModulePackages;
                modules = lib.optionals config.services.xserver.enable [
                  "nvidia"
                  "nvidia_modeset"
                  "nvidia_drm"
                ];
                old = {
                  inherit extraModulePackages;
                  kernelModules = lib.optionals config.services.xserver.enable [
                    "nvidia"
                    "nvidia_modeset"
                    "nvidia_drm"
                  ];
                };
              })
              {
                assertions = [
                  {
                    assertion = cfg.gsp.enable -> (cfg.package ? firmware);
                    message = "This version of NVIDIA driver does not provide a GSP firmware.";
                  }
                  {
                    assertion = useOpenModules -> (cfg.package ? open);
                    message = "This version of NVIDIA driver does not provide a corresponding opensource kernel driver.";
                  }
                ];
                hardware.firmware = lib.optional cfg.gsp.enable nvidia_x11.firmware;
                hardware.graphics = {
                  extraPackages = [ nvidia_x11.out ];
                  extraPackages32 = [ nvidia_x11.lib32 ];
                };
                environment.etc = {
                  "nvidia/nvidia-application-profiles-rc" = lib.mkIf nvidia_x11.useProfiles {
                    source = "${nvidia_x11.bin}/share/nvidia/nvidia-application-profiles-rc";
                  };
                  "egl/egl_external_platform.d".source = "/run/opengl-driver/share/egl/egl_external_platform.d/";
                };
                environment.systemPackages =
                  lib.optional cfg.nvidiaSettings nvidia_x11.settings
                  ++ lib.optional cfg.nvidiaPersistenced nvidia_x11.persistenced;
                systemd.services.nvidia-persistenced = persistenced;
              }
              (lib.mkIf cfg.dynamicBoost.enable {
                systemd.services.nvidia-powerd = {
                  description = "nvidia-powerd service";
                  wantedBy = [ "multi-user.target" ];
                  serviceConfig = {
                    Type = "dbus";
                    BusName = "nvidia.powerd.server";
                    ExecStart = "${nvidia_x11.bin}/bin/nvidia-powerd";
                  };
                };
              })
            ]
          ))
          # Data Center
          (lib.mkIf cfg.datacenter.enable (
            lib.mkMerge [
              (boot {
                inherit extraModulePackages;
                old = { inherit extraModulePackages; };
              })
              {
                systemd.services.nvidia-fabricmanager = {
                  wantedBy = [ "multi-user.target" ];
                  unitConfig.After = [ "network-online.target" ];
                  unitConfig.Requires = [ "network-online.target" ];
                  serviceConfig = {
                    Type = "forking";
                    TimeoutStartSec = 240;
                    ExecStart = "${lib.getExe nvidia_x11.fabricmanager} -c /etc/fabricmanager.cfg";
                  };
                };
                systemd.services.nvidia-persistenced = persistenced;
                environment.systemPackages = [
                  nvidia_x11.fabricmanager
                ]
                ++ lib.optional cfg.nvidiaPersistenced nvidia_x11.persistenced;
              }
            ]
          ))
        ]
      );
    }
  )

  # nixos/modules/tasks/network-interfaces.nix (NixOS/nixpkgs 003a3fd2): networking.hostName,
  # a DNS label or "" (from DHCP), default config.system.nixos.distroId ("nixos").
  (
    { lib, ... }:
    {
      options.networking.hostName = lib.mkOption {
        type = lib.types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$";
        default = "nixos";
      };
    }
  )

  # nixos/modules/services/computing/slurm/slurm.nix (NixOS/nixpkgs 03b2d8c5): the options the
  # test machine sets (server/client enable, controlMachine, nodeName and partitionName as lists
  # of lines, extraConfig, extraConfigPaths), and services.munge.enable = mkDefault true
  # (services/security/munge.nix: munged.service).
  (
    { config, lib, ... }:
    let
      cfg = config.services.slurm;
    in
    {
      options.services.slurm = {
        server.enable = lib.mkEnableOption "the slurm control daemon";
        client.enable = lib.mkEnableOption "the slurm client daemon";
        controlMachine = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
        };
        nodeName = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
        };
        partitionName = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
        };
        extraConfig = lib.mkOption {
          type = lib.types.lines;
          default = "";
        };
        extraConfigPaths = lib.mkOption {
          type = lib.types.listOf lib.types.path;
          default = [ ];
        };
      };
      options.services.munge.enable = lib.mkEnableOption "munge";
      config = lib.mkIf (cfg.server.enable || cfg.client.enable) {
        services.munge.enable = lib.mkDefault true;
      };
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

  # nixos/modules/hardware/graphics.nix (NixOS/nixpkgs 0009474f) and the X server's default for it
  # (services/x11/xserver.nix: mkDefault true, as `hardware.opengl.enable` before the rename): the
  # driver links, systemd-tmpfiles `L+` rules to a buildEnv of the driver packages, or an `r` rule
  # for "-32" without enable32Bit.
  (
    {
      config,
      lib,
      pkgs,
      ...
    }:
    let
      cfg = config.hardware.graphics;
      driversEnv = pkgs.buildEnv {
        name = "graphics-drivers";
        paths = [
          cfg.package
          pkgs.libGL
        ]
        ++ cfg.extraPackages;
      };
      driversEnv32 = pkgs.buildEnv {
        name = "graphics-drivers-32bit";
        paths = [
          cfg.package32
          pkgs.libGL
        ]
        ++ cfg.extraPackages32;
      };
      packages = lib.mkOption {
        type = lib.types.listOf lib.types.package;
        default = [ ];
      };
    in
    {
      options.hardware.graphics = {
        enable = lib.mkEnableOption "hardware accelerated graphics drivers";
        enable32Bit = lib.mkEnableOption "32-bit drivers";
        package = lib.mkOption {
          type = lib.types.package;
          default = pkgs.mesa;
        };
        package32 = lib.mkOption {
          type = lib.types.package;
          default = pkgs.pkgsi686Linux.mesa;
        };
        extraPackages = packages;
        extraPackages32 = packages;
      };
      config = lib.mkMerge [
        (lib.mkIf config.services.xserver.enable { hardware.graphics.enable = lib.mkDefault true; })
        (lib.mkIf cfg.enable {
          systemd.tmpfiles.settings.graphics-driver = {
            "/run/opengl-driver"."L+".argument = toString driversEnv;
            "/run/opengl-driver-32" =
              if pkgs.stdenv.hostPlatform.isi686 then
                { "L+".argument = "opengl-driver"; }
              else if cfg.enable32Bit then
                { "L+".argument = toString driversEnv32; }
              else
                { "r" = { }; };
          };
        })
      ];
    }
  )

  # nixos/modules/system/boot/systemd/tmpfiles.nix (NixOS/nixpkgs 04659916): settings.<name> is
  # written to tmpfiles.d/<name>.conf (writeTextDir "lib/tmpfiles.d/<name>.conf"), all of them
  # joined into environment.etc."tmpfiles.d" (the trigger of systemd-tmpfiles-resetup). The
  # entries' submodule defaults (mode, user, group, age "-", argument "") are not modelled: we read
  # only "L+" entries' argument.
  (
    {
      config,
      lib,
      pkgs,
      ...
    }:
    let
      rules =
        paths:
        lib.concatStrings (
          lib.concatLists (
            lib.mapAttrsToList (
              path: types:
              lib.mapAttrsToList (
                type: entry: "'${type}' '${path}' '-' '-' '-' '-' ${entry.argument or ""}\n"
              ) types
            ) paths
          )
        );
    in
    {
      options.systemd.tmpfiles.settings = lib.mkOption {
        type = lib.types.attrsOf (lib.types.attrsOf (lib.types.attrsOf lib.types.anything));
        default = { };
      };
      # rules: lines of 00-nixos.conf, in the same tmpfiles.d environment.
      options.systemd.tmpfiles.rules = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
      };
      config.environment.etc."tmpfiles.d".source = pkgs.symlinkJoin {
        name = "tmpfiles.d";
        paths = [
          (pkgs.writeTextDir "lib/tmpfiles.d/00-nixos.conf" (
            lib.concatStringsSep "\n" config.systemd.tmpfiles.rules
          ))
        ]
        ++ lib.mapAttrsToList (
          name: paths: pkgs.writeTextDir "lib/tmpfiles.d/${name}.conf" (rules paths)
        ) config.systemd.tmpfiles.settings;
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
        requiredBy = listOf str;
        before = listOf str;
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
        # nixos/modules/services/hardware/udev.nix (qweered/nixpkgs cf08dd696189): each package
        # is compressed (compressFirmware: firmwareCompression "zstd" for kernels >= 5.19, the
        # double's 6.18; pkgs.compressFirmwareZstd renames every file to .zst) unless it says
        # `compressFirmware = false` (nvidia_x11's passthru), then joined by buildEnv; activation
        # writes "${config.hardware.firmware}/lib/firmware" to
        # /sys/module/firmware_class/parameters/path.
        hardware.firmware = lib.mkOption {
          type = lib.types.listOf lib.types.package;
          default = [ ];
          apply =
            list:
            pkgs.buildEnv {
              name = "firmware";
              paths = map (
                firmware:
                if (firmware.compressFirmware or true) == false then
                  firmware
                else
                  pkgs.compressFirmwareZstd firmware
              ) list;
              pathsToLink = [ "/lib/firmware" ];
              ignoreCollisions = true;
            };
        };
        services.xserver.enable = lib.mkEnableOption "the X server";
        # specialisation.<name>.configuration is a deferredModule: kept as written, evaluated later.
        specialisation = lib.mkOption {
          type = lib.types.attrsOf lib.types.raw;
          default = { };
        };
        fileSystems = lib.mkOption {
          type = lib.types.attrsOf lib.types.anything;
          default = { };
        };
        # nixos/modules/system/activation/top-level.nix (NixOS/nixpkgs 01502f43): internal, default
        # pkgs.stdenv.hostPlatform.linux-kernel.target ("bzImage" on x86_64).
        system.boot.loader.kernelFile = lib.mkOption {
          type = lib.types.str;
          default = "bzImage";
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
