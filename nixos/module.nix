# services.nvidiaKmodSwap: swap the loaded NVIDIA kernel modules for the driver of the new system
# generation before nvidia-persistenced starts, instead of letting the unit (and the deploy) fail on
# "NVRM: API mismatch". Options become one JSON file for the helper; nothing clever happens in Nix.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.nvidiaKmodSwap;
  nvidiaCfg = config.hardware.nvidia;
  kernel = config.boot.kernelPackages.kernel;

  # modDirVersion, not the package version: it is the directory under lib/modules and what the
  # running kernel reports (e.g. "6.12.8" vs "6.12.8-zen1").
  release = kernel.modDirVersion;

  # The tree that boot.extraModulePackages gets from hardware.nvidia: `.open` for the open kernel
  # modules (kernel/drivers/video/), `.bin` for the proprietary ones (misc/).
  moduleTree = if nvidiaCfg.open or false then cfg.nvidiaPackage.open else cfg.nvidiaPackage.bin;

  settings = {
    driver_version = cfg.nvidiaPackage.version;
    kernel_release = release;
    module_dirs = [ "${moduleTree}/lib/modules/${release}" ] ++ cfg.extraModuleDirs;
    modules = [
      "nvidia"
      "nvidia_modeset"
      "nvidia_uvm"
    ] ++ lib.optional (nvidiaCfg.modesetting.enable or false) "nvidia_drm";
    # What the running system booted with; the helper also remembers what it loaded itself.
    rollback_dirs = [ "/run/booted-system/kernel-modules/lib/modules/${release}" ];
    on_busy = cfg.onBusy;
    on_kernel_change = cfg.onKernelChange;
    stop_units = cfg.stopUnits;
    verify_command =
      if cfg.verify then
        [
          "${cfg.nvidiaPackage.bin}/bin/nvidia-smi"
          "--query-gpu=driver_version"
          "--format=csv,noheader"
        ]
      else
        null;
    settle_timeout_s = cfg.settleTimeout;
    state_dir = "/run/nvidia-kmod-swap";
    allowed_prefixes = [ "${builtins.storeDir}/" ];
  };

  # Its store path changes with the driver, so switching generations changes the unit and
  # switch-to-configuration restarts it: that restart is when the swap happens.
  configFile = pkgs.writeText "nvidia-kmod-swap.json" (builtins.toJSON settings);
  helper = "${cfg.package}/bin/nvidia-kmod-swap --config ${configFile}";
in
{
  options.services.nvidiaKmodSwap = {
    enable = lib.mkEnableOption ''
      live NVIDIA driver updates: before nvidia-persistenced starts, swap the loaded NVIDIA kernel
      modules for the ones of the driver in the system profile, or defer with a clear reason'';

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ../helper/package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./helper/package.nix { }";
      description = "The nvidia-kmod-swap helper.";
    };

    nvidiaPackage = lib.mkOption {
      type = lib.types.package;
      default = nvidiaCfg.package;
      defaultText = lib.literalExpression "config.hardware.nvidia.package";
      description = ''
        The NVIDIA driver whose kernel modules must be loaded. Its `version` and its `bin`
        (or `open`, with `hardware.nvidia.open`) output's `lib/modules/<modDirVersion>` are used.
      '';
    };

    onBusy = lib.mkOption {
      type = lib.types.enum [
        "defer"
        "fail"
        "stop-units"
      ];
      default = "defer";
      description = ''
        What to do when processes hold /dev/nvidia*: `defer` leaves the old driver loaded and skips
        the unit (the deploy succeeds; restart nvidia-persistenced once the GPU is idle), `fail`
        fails the unit, `stop-units` stops the units in `stopUnits`, swaps, and starts them again.
        Processes are never killed.
      '';
    };

    stopUnits = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "ollama.service" ];
      description = "Units that `onBusy = \"stop-units\"` may stop for the swap and start again.";
    };

    onKernelChange = lib.mkOption {
      type = lib.types.enum [
        "defer"
        "fail"
      ];
      default = "defer";
      description = ''
        What to do when the new generation's kernel differs from the running one (its modules
        cannot be loaded until a reboot): `defer` skips the unit, `fail` fails it.
      '';
    };

    verify = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "After a swap, run the new driver's nvidia-smi and require it to report the new version.";
    };

    settleTimeout = lib.mkOption {
      type = lib.types.ints.positive;
      default = 10;
      description = "Seconds to wait for udev to create the device nodes after loading the modules.";
    };

    extraModuleDirs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = lib.literalExpression ''[ "''${gdrcopy}/lib/modules/''${config.boot.kernelPackages.kernel.modDirVersion}" ]'';
      description = ''
        More module trees searched for new builds of modules that hold `nvidia` (gdrdrv, nvidia-fs,
        ...). A holder with no new build makes the helper refuse the swap rather than drop it.
      '';
    };

    standalone = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Run the helper in its own oneshot unit, `nvidia-kmod-swap.service`, for systems that do not
        enable `hardware.nvidia.nvidiaPersistenced`.
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = cfg.standalone || (nvidiaCfg.nvidiaPersistenced or false);
            message = ''
              services.nvidiaKmodSwap hooks into nvidia-persistenced: set
              hardware.nvidia.nvidiaPersistenced = true, or services.nvidiaKmodSwap.standalone = true.
            '';
          }
          {
            assertion = cfg.nvidiaPackage ? version && cfg.nvidiaPackage ? bin;
            message = "services.nvidiaKmodSwap.nvidiaPackage must be an NVIDIA driver package (with `version` and a `bin` output).";
          }
        ];

        # `nvidia-kmod-swap status` and `plan` find it here without --config.
        environment.etc."nvidia-kmod-swap/config.json".source = configFile;
        environment.systemPackages = [ cfg.package ];
      }

      (lib.mkIf (!cfg.standalone) {
        # Merged into the unit hardware.nvidia defines; "+" runs with full privileges whatever the
        # unit's sandboxing. check decides whether the unit starts at all (exit 1 skips it, which is
        # not a failure: a deferred swap does not fail the deploy); swap does the work.
        systemd.services.nvidia-persistenced = {
          restartTriggers = [ configFile ];
          serviceConfig = {
            ExecCondition = lib.mkBefore [ "+${helper} check" ];
            ExecStartPre = lib.mkBefore [ "+${helper} swap" ];
          };
        };
      })

      (lib.mkIf cfg.standalone {
        systemd.services.nvidia-kmod-swap = {
          description = "Swap the loaded NVIDIA kernel modules for the system profile's driver";
          wantedBy = [ "multi-user.target" ];
          after = [ "systemd-modules-load.service" ];
          restartTriggers = [ configFile ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecCondition = "${helper} check";
            ExecStart = "${helper} swap";
          };
        };
      })
    ]
  );
}
