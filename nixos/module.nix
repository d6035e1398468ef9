# services.nvidiaKmodSwap: swap the loaded NVIDIA kernel modules for the driver of the new system
# generation before nvidia-persistenced starts, instead of letting the unit (and the deploy) fail on
# "NVRM: API mismatch". Options become one JSON file for the helper; nothing clever happens in Nix.
{
  config,
  options,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.nvidiaKmodSwap;
  nvidiaCfg = config.hardware.nvidia;
  # Some 2026 trees move boot.kernelPackages, boot.kernelModules and boot.extraModulePackages to
  # boot.kernel.* (kernel.nix, mkRenamedOptionModule); reading an old name there prints "Obsolete
  # option" on every evaluation, so the new names are read where they exist.
  renamedKernel = (options.boot.kernel or { }) ? packages;
  kernelPackages =
    if renamedKernel then config.boot.kernel.packages else config.boot.kernelPackages;
  kernelModules = if renamedKernel then config.boot.kernel.modules else config.boot.kernelModules;
  extraModulePackages =
    if renamedKernel then
      config.boot.kernel.extraModulePackages
    else
      config.boot.extraModulePackages;
  kernel = kernelPackages.kernel;

  # modDirVersion, not the package version: it is the directory under lib/modules and what the
  # running kernel reports (e.g. "6.12.8" vs "6.12.8-zen1").
  release = kernel.modDirVersion;

  # The kernel modules NVIDIA's driver consists of (kernel-open/Makefile in
  # NVIDIA/open-gpu-kernel-modules: NV_KERNEL_MODULES ?= nvidia nvidia-uvm nvidia-vgpu-vfio
  # nvidia-modeset nvidia-drm nvidia-peermem), by their kernel names.
  driverModules = [
    "nvidia"
    "nvidia_uvm"
    "nvidia_vgpu_vfio"
    "nvidia_modeset"
    "nvidia_drm"
    "nvidia_peermem"
  ];
  # What this generation loads at boot (boot.kernelModules takes either spelling); the helper also
  # reloads whatever is loaded when it swaps. `nvidia` always: every other one needs it, and so
  # does nvidia-persistenced.
  bootModules = map (lib.replaceStrings [ "-" ] [ "_" ]) kernelModules;
  modules = [ "nvidia" ] ++ lib.filter (m: m != "nvidia" && lib.elem m bootModules) driverModules;

  # The unit whose start runs `swap`, and so the one every GPU unit is ordered after.
  swapUnit = if cfg.standalone then "nvidia-kmod-swap.service" else "nvidia-persistenced.service";

  # NVIDIA's own units besides nvidia-persistenced, when this configuration defines them: each runs
  # NVML or configures the GPU, so it fails against the old module after a bump (exit 18) and loses
  # its state when the driver reloads. Detected by the options that define them (reading
  # config.systemd.services' names here would recurse: we define into it).
  #   nvidia-container-toolkit-cdi-generator: hardware.nvidia-container-toolkit.enable
  #     (nixos/modules/services/hardware/nvidia-container-toolkit/default.nix: nvidia-ctk cdi generate)
  #   nvidia-powerd: hardware.nvidia.dynamicBoost.enable (nixos/modules/hardware/video/nvidia.nix)
  #   nvidia-fabricmanager: hardware.nvidia.datacenter.enable (same file)
  enabled = path: lib.attrByPath path false config;
  nvidiaUnits =
    lib.optional (enabled [
      "hardware"
      "nvidia-container-toolkit"
      "enable"
    ]) "nvidia-container-toolkit-cdi-generator"
    ++ lib.optional (enabled [
      "hardware"
      "nvidia"
      "dynamicBoost"
      "enable"
    ]) "nvidia-powerd"
    ++ lib.optional (enabled [
      "hardware"
      "nvidia"
      "datacenter"
      "enable"
    ]) "nvidia-fabricmanager";
  gpuUnits = lib.unique (nvidiaUnits ++ cfg.gpuUnits);
  # genAttrs below would make a unit of a misspelt name, with nothing to run: an assertion says so.
  undefinedGpuUnits = lib.filter (
    u: !((config.systemd.services.${u}.serviceConfig or { }) ? ExecStart)
  ) cfg.gpuUnits;

  # What one start of the swap unit may take at most (swap.py): the lock, a momentary holder in
  # `check` and in `swap`, stopping units (settle), an unload refused for a moment, the device nodes
  # (settle), the verify command (60 s), a rollback's momentary holder (busyGrace), its nodes
  # (settle) and the old driver's own verify command (60 s), and a margin.
  startBudget = cfg.lockTimeout + 4 * cfg.busyGrace + 3 * cfg.settleTimeout + 2 * 60 + 30;

  # graphics.nix's driver links of this generation (systemd.tmpfiles.settings.graphics-driver:
  # "/run/opengl-driver"."L+".argument = toString driversEnv, and "-32" likewise with enable32Bit):
  # what a pin to this driver points programs at while a later generation waits for its swap.
  graphicsRules = config.systemd.tmpfiles.settings.graphics-driver or { };
  driverLinks = lib.mapAttrs (_: rule: rule."L+".argument) (
    lib.filterAttrs (
      _: rule: rule ? "L+" && lib.hasPrefix "/" (toString (rule."L+".argument or ""))
    ) graphicsRules
  );

  moduleDirs = [ "${config.system.modulesTree}/lib/modules/${release}" ] ++ cfg.extraModuleDirs;
  # The facts of the driver's module files (version, srcversion, vermagic, depends), computed once
  # here from the immutable store paths, so that activation reads no module file: a real
  # nvidia.ko.xz is 42 MB of xz (docs/performance.md). The helper reads a file these do not cover.
  moduleFacts = pkgs.runCommand "nvidia-kmod-swap-module-facts" { } ''
    ${lib.getExe cfg.package} facts ${lib.escapeShellArgs moduleDirs} \
      ${lib.concatMapStringsSep " " (d: "--every ${lib.escapeShellArg d}") cfg.extraModuleDirs} > $out
  '';

  settings = {
    driver_version = cfg.nvidiaPackage.version;
    kernel_release = release;
    # The new generation's modules are what it installs: system.modulesTree
    # (nixos/modules/system/boot/kernel.nix: the kernel's modules ++ boot.extraModulePackages,
    # merged by aggregateModules), whatever hardware.nvidia put there (`mod`, `open`, or `bin`
    # before 2026) or the user overrode. The helper looks modules up in it by name.
    module_dirs = moduleDirs;
    module_facts = [ "${moduleFacts}" ];
    inherit modules;
    # What the running system booted with; the helper also remembers what it loaded itself.
    rollback_dirs = [ "/run/booted-system/kernel-modules/lib/modules/${release}" ];
    # This generation's kernel image, as /run/booted-system/kernel names the booted one (kernel.nix:
    # kernelPath, `ln -s ${kernelPath} $out/kernel`): a kernel rebuilt with the same release
    # (modDirVersion) is a kernel change too.
    kernel_image = "${kernel}/${config.system.boot.loader.kernelFile}";
    on_busy = cfg.onBusy;
    on_kernel_change = cfg.onKernelChange;
    # Unit names with their suffix, as the helper compares them with a holder's unit.
    stop_units = map (
      u: if lib.hasSuffix ".service" u || lib.hasSuffix ".target" u then u else "${u}.service"
    ) cfg.stopUnits;
    verify_command =
      if cfg.verify then
        [
          # nvidia_x11's builder.sh installs nvidia-smi in the `bin` output.
          "${lib.getBin cfg.nvidiaPackage}/bin/nvidia-smi"
          "--query-gpu=driver_version"
          "--format=csv,noheader"
        ]
      else
        null;
    settle_timeout_s = cfg.settleTimeout;
    state_dir = "/run/nvidia-kmod-swap";
    allowed_prefixes = [ "${builtins.storeDir}/" ];
    # Symlinks below Nix's gcroots that point into the store are GC roots (nix: libstore/gc.cc,
    # findRoots): the files of the loaded driver, the next swap's rollback source, are kept.
    gc_root_dir = "/nix/var/nix/gcroots/nvidia-kmod-swap";
    # Where this generation's activation points the firmware loader (udev.nix / nixos-init:
    # "${config.hardware.firmware}/lib/firmware"); the new driver's GSP firmware is there.
    firmware_path = "${config.hardware.firmware}/lib/firmware";
    busy_grace_s = cfg.busyGrace;
    lock_timeout_s = cfg.lockTimeout;
    swap_unit = swapUnit;
    gpu_units = map (u: "${u}.service") gpuUnits;
    driver_links = if driverLinks == { } then null else driverLinks;
    # nvidia_x11's builder.sh installs nvidia-smi in `bin`, with a RUNPATH to its own `out`/lib.
    nvidia_smi = "${lib.getBin cfg.nvidiaPackage}/bin/nvidia-smi";
    slurm =
      if cfg.slurm.enable then
        {
          node = cfg.slurm.nodeName;
          inherit (cfg.slurm) scontrol partition;
          max_unavailable = toString cfg.slurm.maxUnavailable;
          settle_s = cfg.slurm.settleTime;
          units = map (u: if lib.hasSuffix ".service" u then u else "${u}.service") cfg.slurm.units;
        }
      else
        null;
  };

  configFile = pkgs.writeText "nvidia-kmod-swap.json" (builtins.toJSON settings);
  # The units name the config and the helper by paths that do not change between generations:
  # /etc and /run/current-system are the new generation's once its activation has run, before
  # switch-to-configuration starts units. A store path on the command line would make every
  # change of the module tree or the firmware (a linux-firmware, zfs or v4l2loopback bump) a new
  # unit, restarting nvidia-persistenced and every GPU unit, fabric manager included (whose
  # nixpkgs default ABORT_CUDA_JOBS_ON_FM_EXIT = 1 aborts running CUDA jobs).
  configPath = "/etc/nvidia-kmod-swap/config.json";
  helper = "/run/current-system/sw/bin/nvidia-kmod-swap --config ${configPath}";
  # What restarts the swap unit and the GPU units: the driver and its kernel modules, and nothing
  # else. The driver's module packages are those of the generation's extra module packages that
  # are the driver's own outputs (nvidia.nix: `if useOpenModules then [ open ] else [ mod ]`,
  # `bin` before 2026); a new kernel rebuilds them, and so restarts the units too.
  driverOutputs = lib.filter lib.isDerivation (
    map (o: cfg.nvidiaPackage.${o} or null) [
      "mod"
      "open"
      "bin"
    ]
  );
  driverModulePackages = lib.filter (
    p: lib.isDerivation p && lib.any (o: o.outPath == p.outPath) driverOutputs
  ) extraModulePackages;
  driverTriggers = [ cfg.nvidiaPackage ] ++ driverModulePackages ++ cfg.extraModuleDirs;
  persistenced = config.systemd.services.nvidia-persistenced;
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
        The NVIDIA driver of this generation: its `version` is the version the loaded modules must
        have, and its nvidia-smi (`bin` output) verifies a swap. The module files themselves come
        from the generation's module tree (`system.modulesTree`), where `hardware.nvidia` puts them.
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
      example = [ "ollama" ];
      description = ''
        Services that `onBusy = "stop-units"` may stop for the swap and start again (names with or
        without `.service`).
      '';
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
      description = "After a swap, require the new driver's nvidia-smi to report the new version.";
    };

    settleTimeout = lib.mkOption {
      type = lib.types.ints.positive;
      default = 10;
      description = "Seconds to wait for udev to make the device nodes after loading the modules.";
    };

    extraModuleDirs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = lib.literalExpression ''
        [ "''${gdrcopy}/lib/modules/''${config.boot.kernelPackages.kernel.modDirVersion}" ]
      '';
      description = ''
        More module trees searched for new builds of modules that hold `nvidia` (gdrdrv, nvidia-fs,
        ...). A holder with no new build makes the helper refuse the swap rather than drop it.
      '';
    };

    gpuUnits = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "gpu-power-limit" ];
      description = ''
        Your own services (names without `.service`) that use the GPU, e.g. one that sets power
        limits with nvidia-smi. Like the NVIDIA units the module finds by itself
        (nvidia-container-toolkit-cdi-generator, nvidia-powerd, nvidia-fabricmanager), each is
        ordered after the swap, skipped while a swap is deferred, run again by the switch that
        changes the driver and by a deferred swap when it finishes.
      '';
    };

    busyGrace = lib.mkOption {
      type = lib.types.ints.unsigned;
      default = 5;
      description = ''
        Seconds to wait for processes that hold /dev/nvidia* for a moment (nvidia-smi, NVML, a CDI
        generator) before a swap is deferred, and for a module unload the kernel refuses meanwhile.
      '';
    };

    lockTimeout = lib.mkOption {
      type = lib.types.ints.positive;
      default = 60;
      description = "Seconds a run waits for another run of the helper to finish.";
    };

    retryInterval = lib.mkOption {
      type = lib.types.ints.positive;
      default = 30;
      description = ''
        While a swap is deferred because the GPU is busy, how often `nvidia-kmod-swap-retry.timer`
        looks whether it is idle now; when it is, the swap runs (the swap unit is started, then the
        GPU units again). Nothing is deferred: each tick reads one file and exits.
      '';
    };

    slurm = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = ''
          On a node of a Slurm cluster, let Slurm take the node out of service for a swap: while
          a swap waits for a busy GPU, and before any swap, drain the node (`scontrol update
          State=DRAIN`, with a reason naming nvidia-kmod-swap and the two versions; running jobs
          finish, no new one starts), swap once slurmctld shows no job on it, verify the new
          driver, and resume the node. A failed swap or verification leaves the node drained with
          a reason that says why. A drain by an admin or by Slurm itself is never lifted. At most
          `maxUnavailable` nodes are drained by nvidia-kmod-swap at once, counted from slurmctld's
          state. See docs/fleet.md.
        '';
      };

      nodeName = lib.mkOption {
        type = lib.types.str;
        default = config.networking.hostName;
        defaultText = lib.literalExpression "config.networking.hostName";
        description = "This node's NodeName in slurm.conf (slurmd's default is the short host name).";
      };

      maxUnavailable = lib.mkOption {
        type = lib.types.either lib.types.ints.positive (lib.types.strMatching "[1-9][0-9]?%|100%");
        default = 1;
        example = "25%";
        description = ''
          How many nodes may be drained by nvidia-kmod-swap at the same time: a count, or a
          percentage of `partition`'s nodes (of all nodes when it is null), rounded up, at least one.
          A node over the bound waits, undrained, and tries again with the retry timer.
        '';
      };

      partition = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "gpu";
        description = "The partition a percentage `maxUnavailable` is of.";
      };

      settleTime = lib.mkOption {
        type = lib.types.ints.unsigned;
        default = 5;
        description = ''
          Seconds between draining this node and reading the fleet again: nodes that drained in
          the same moment see each other then, and all but the first `maxUnavailable` of them
          (by slurmctld's drain time, then name) give their drain back. Longer than the clock skew
          between nodes and slurmctld, and a second more than its time resolution.
        '';
      };

      units = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ "slurmd" ];
        description = ''
          Slurm's own services that hold the GPU outside any job: slurmd with `AutoDetect=nvml`
          keeps NVML open for its life (Slurm 25.05's gpu_nvml.c). Once the node is drained and
          shows no job, the swap stops them and starts them again, so that slurmd detects the GPUs
          on the new driver.
        '';
      };

      scontrol = lib.mkOption {
        type = lib.types.str;
        default = "/run/current-system/sw/bin/scontrol";
        description = ''
          The scontrol to run: by default services.slurm's wrapped one (it sets SLURM_CONF to the
          generation's slurm.conf), which the slurm module puts in environment.systemPackages.
        '';
      };
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
        # nvidia.nix (2026) asserts `!cfg.open || ...`, an evaluation error ("expected a Boolean
        # but found null") when hardware.nvidia.open is left null, as a datacenter configuration
        # may leave it (its own "You must configure hardware.nvidia.open" assertion exempts
        # datacenter.enable). NixOS evaluates every assertion in list order, so this one, first
        # (mkBefore), stops the evaluation with words a user can act on instead.
        assertions = lib.mkBefore [
          {
            assertion =
              !(nvidiaCfg.enabled or false && nvidiaCfg ? open && nvidiaCfg.open == null)
              || throw ''
                services.nvidiaKmodSwap: hardware.nvidia.open is null, and nixpkgs' nvidia.nix
                cannot evaluate its assertions with it (`!cfg.open`). Set hardware.nvidia.open =
                true to use the open kernel modules (Turing and later GPUs) or false for the
                proprietary ones.
              '';
            message = "hardware.nvidia.open must be true or false";
          }
        ];
      }
      {
        assertions = [
          {
            assertion = cfg.standalone || nvidiaCfg.nvidiaPersistenced;
            message = ''
              services.nvidiaKmodSwap hooks into nvidia-persistenced: set
              hardware.nvidia.nvidiaPersistenced = true, or
              services.nvidiaKmodSwap.standalone = true.
            '';
          }
          {
            # hardware.nvidia defines the unit only when the driver is enabled
            # (services.xserver.videoDrivers = [ "nvidia" ] or hardware.nvidia.datacenter.enable;
            # the 2026 nvidia.nix has no hardware.nvidia.enable); without it our hooks would make a
            # unit with nothing to start.
            assertion = cfg.standalone || persistenced.serviceConfig ? ExecStart;
            message = ''
              services.nvidiaKmodSwap: hardware.nvidia.nvidiaPersistenced is set, but no
              nvidia-persistenced service with an ExecStart is defined: the NVIDIA driver is not
              enabled. Enable it with services.xserver.videoDrivers = [ "nvidia" ] or
              hardware.nvidia.datacenter.enable = true, or use
              services.nvidiaKmodSwap.standalone = true.
            '';
          }
          {
            assertion = !cfg.slurm.enable || cfg.slurm.nodeName != "";
            message = ''
              services.nvidiaKmodSwap.slurm.enable needs this node's NodeName in slurm.conf:
              networking.hostName is empty, so set services.nvidiaKmodSwap.slurm.nodeName.
            '';
          }
          {
            assertion = undefinedGpuUnits == [ ];
            message = ''
              services.nvidiaKmodSwap.gpuUnits names units that are not defined (no ExecStart):
              ${lib.concatStringsSep ", " undefinedGpuUnits}. Give service names without ".service".
            '';
          }
          {
            assertion = cfg.nvidiaPackage ? version;
            message = "services.nvidiaKmodSwap.nvidiaPackage is not an NVIDIA driver (no version).";
          }
        ];

        # Where the units' helper reads it (configPath), and `nvidia-kmod-swap status` and `plan`
        # without --config.
        environment.etc."nvidia-kmod-swap/config.json".source = configFile;
        environment.systemPackages = [ cfg.package ];

        systemd.services = lib.mkMerge [
          # A deferred swap finishes by itself once the GPU is idle.
          {
            nvidia-kmod-swap-retry = {
              description = "Finish a deferred NVIDIA driver swap once the GPU is idle";
              serviceConfig = {
                Type = "oneshot";
                ExecStart = "${helper} retry-deferred";
              };
            };
          }
          # Every GPU unit: after the swap (switch-to-configuration queues their starts together
          # with the swap unit's, and systemd orders queued jobs by After=), skipped while the swap
          # is deferred (the same `check`), and restarted with a new config, as its GPU state goes
          # with the old driver.
          (lib.genAttrs gpuUnits (_: {
            after = [ swapUnit ];
            restartTriggers = driverTriggers;
            serviceConfig.ExecCondition = lib.mkBefore [ "+${helper} check" ];
          }))
          # While the loaded driver is not this generation's, keep /run/opengl-driver on the loaded
          # driver's libraries. switch-to-configuration-ng restarts sysinit-reactivation.target after
          # the activation and before any other unit (src/main.rs); systemd-tmpfiles-resetup, in it,
          # re-applies graphics.nix's rule whenever /etc/tmpfiles.d changed (a new driver always
          # changes it). This runs first, with the same trigger, and leaves a runtime rule that
          # resetup (and any later systemd-tmpfiles --create) keeps; the swap removes it.
          {
            nvidia-kmod-swap-pin = {
              description = "Keep the NVIDIA driver links on the loaded driver until it is swapped";
              requiredBy = [ "sysinit-reactivation.target" ];
              before = [
                "systemd-tmpfiles-resetup.service"
                "sysinit-reactivation.target"
              ];
              after = [ "local-fs.target" ];
              restartTriggers = lib.optional (
                config.environment.etc ? "tmpfiles.d"
              ) config.environment.etc."tmpfiles.d".source;
              unitConfig.DefaultDependencies = false;
              serviceConfig = {
                Type = "oneshot";
                RemainAfterExit = true;
                ExecStart = "${helper} pin";
              };
            };
          }
        ];
        systemd.timers.nvidia-kmod-swap-retry = {
          wantedBy = [ "timers.target" ];
          timerConfig = {
            OnActiveSec = cfg.retryInterval;
            OnUnitInactiveSec = cfg.retryInterval;
          };
        };
      }

      (lib.mkIf (!cfg.standalone) {
        # Merged into the unit hardware.nvidia defines; "+" runs with full privileges whatever the
        # unit's sandboxing. check decides whether the unit starts at all (exit 1 skips it, which is
        # not a failure: a deferred swap does not fail the deploy); swap does the work.
        systemd.services.nvidia-persistenced = {
          restartTriggers = driverTriggers;
          serviceConfig = {
            ExecCondition = lib.mkBefore [ "+${helper} check" ];
            ExecStartPre = lib.mkBefore [ "+${helper} swap" ];
            # The helper's own budget (startBudget); systemd's default of 90 s could cut a swap.
            TimeoutStartSec = lib.mkDefault startBudget;
          };
        };
      })

      # nixpkgs' CDI generator writes its spec to RuntimeDirectory=cdi, which systemd removes when
      # the unit stops: the switch stops it and the gate skips it while a swap waits, leaving
      # containers no spec ("unresolvable CDI devices"). Kept, the spec is the loaded driver's
      # (the one it was generated for), and the generator runs again after the swap.
      (lib.mkIf
        (enabled [
          "hardware"
          "nvidia-container-toolkit"
          "enable"
        ])
        {
          systemd.services.nvidia-container-toolkit-cdi-generator.serviceConfig.RuntimeDirectoryPreserve =
            lib.mkDefault "yes";
        }
      )

      (lib.mkIf cfg.standalone {
        systemd.services.nvidia-kmod-swap = {
          description = "Swap the loaded NVIDIA kernel modules for the system profile's driver";
          wantedBy = [ "multi-user.target" ];
          after = [ "systemd-modules-load.service" ];
          restartTriggers = driverTriggers;
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecCondition = "${helper} check";
            ExecStart = "${helper} swap";
            TimeoutStartSec = lib.mkDefault startBudget;
          };
        };
      })
    ]
  );
}
