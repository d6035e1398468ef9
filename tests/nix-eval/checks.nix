# The Nix checks that run without nixpkgs: the module evaluated as NixOS would (module system and
# NixOS modules doubled, see the *-double.nix files), the flake's outputs inspected as
# `nix flake check` inspects them, and our own flake checks (tests/nixos) evaluated. Each check is
# { name; ok; } where ok is true or a string saying what is wrong.
{
  # A real nixpkgs lib (a directory with default.nix) to use instead of lib-double.nix; the
  # module system then is the real lib.evalModules (tests/nix-eval/run --real-lib DIR).
  realLib ? null,
}:
let
  # (The real lib.fileset needs builtins.readFileType, Nix >= 2.14; Debian's Nix 2.8 lacks it, so
  # the double's fileset stands in for it either way.)
  lib =
    if realLib == null then
      import ./lib-double.nix
    else
      import realLib // { inherit (import ./lib-double.nix) fileset; };
  input = era: import ./nixpkgs-input.nix { inherit era lib; };
  inherit (builtins) tryEval deepSeq;

  # A driver shaped like nixpkgs' nvidia_x11 of 2026 (binaries.nix outputs out/bin/firmware;
  # generic.nix passthru mod, open, persistenced; tests/nixos/fake-driver.nix says where from).
  pkgs = import ./nixpkgs-double { inherit lib; };
  fakeDrv =
    name: extra:
    {
      type = "derivation";
      inherit name;
      outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
    }
    // extra;
  # generic.nix (NixOS/nixpkgs 37f8b96b): `inherit version useGLVND useProfiles` are attributes of
  # every output; passthru compressFirmware = false, ibtSupport, settings, fabricmanager.
  driverOf =
    version:
    let
      self = fakeDrv "nvidia-x11-${version}" {
        inherit version;
        # Every derivation has its outputs as attributes (`out` is itself); builder.sh's lib32
        # output holds the 32-bit libraries (i686bundled).
        out = self;
        lib32 = fakeDrv "nvidia-x11-${version}-lib32" { };
        useGLVND = true;
        useProfiles = true;
        compressFirmware = false;
        ibtSupport = true;
        bin = fakeDrv "nvidia-x11-${version}-bin" { };
        firmware = fakeDrv "nvidia-x11-${version}-firmware" { compressFirmware = false; };
        settings = fakeDrv "nvidia-settings-${version}" { };
        fabricmanager = fakeDrv "fabricmanager-${version}" { meta.mainProgram = "nv-fabricmanager"; };
        mod = fakeDrv "nvidia-kernel-modules-6.18.1-${version}" { };
        open = fakeDrv "nvidia-open-6.18.1-${version}" { };
        persistenced = fakeDrv "nvidia-persistenced-${version}" {
          meta.mainProgram = "nvidia-persistenced";
        };
      };
    in
    self;
  driver = driverOf "595.44.01";
  legacyDriver = removeAttrs (driverOf "570.133.07") [ "mod" ];

  system =
    {
      era ? "2026",
      renamed ? false,
      settings ? { },
      hardware ? { },
      extra ? { },
    }:
    (input era).lib.nixosSystem {
      inherit renamed;
      modules = [
        ../../nixos/module.nix
        extra
        {
          nixpkgs.hostPlatform = "x86_64-linux";
          services.nvidiaKmodSwap = settings;
          # `enable` here stands for how a user enables the standard driver: nvidia.nix (2026)
          # declares no hardware.nvidia.enable; services.xserver.videoDrivers = [ "nvidia" ] does.
          # A desktop, then: nvidia.nix loads nvidia_modeset and nvidia_drm at boot only with
          # services.xserver.enable.
          services.xserver.videoDrivers = lib.optional (hardware.enable or false) "nvidia";
          services.xserver.enable = hardware.enable or false;
          hardware.nvidia = removeAttrs hardware [ "enable" ];
          system.stateVersion = "26.05";
        }
      ];
    };
  # hardware.nvidia as a user enables the driver (videoDrivers, package, open).
  nvidia =
    extra:
    {
      enable = true;
      package = driver;
      open = false;
      nvidiaPersistenced = true;
    }
    // extra;
  on =
    settings: hardware:
    system {
      settings = {
        enable = true;
      }
      // settings;
      inherit hardware;
    };

  config = s: s.config;
  json = s: builtins.fromJSON (config s).environment.etc."nvidia-kmod-swap/config.json".source.text;
  unit = s: (config s).systemd.services.nvidia-persistenced.serviceConfig;
  # The units read the config at its /etc path and run the current system's helper (module.nix:
  # configPath, helper), so that nothing but the driver changes their definitions.
  file = _: "/etc/nvidia-kmod-swap/config.json";
  # What restarts them: the driver and its module package in the generation's tree.
  driverTriggers = s: [
    (config s).hardware.nvidia.package.outPath
  ]
  ++ map (p: p.outPath) (
    lib.filter (
      p:
      lib.elem p.outPath (
        map (o: o.outPath) [
          driver.mod
          driver.open
          driver.bin
        ]
      )
    ) (config s).boot.extraModulePackages
  );
  tree = s: "${(config s).system.modulesTree}/lib/modules/6.18.1";
  inTree = s: p: builtins.elem p.outPath (map (x: x.outPath) (config s).boot.extraModulePackages);
  helper = "/run/current-system/sw/bin/nvidia-kmod-swap";
  # What went wrong, or true: a failing comparison names itself.
  expect =
    pairs:
    let
      bad = lib.filter (p: p.got != p.want) pairs;
    in
    if bad == [ ] then
      true
    else
      builtins.concatStringsSep "; " (
        map (p: "${p.what}: got ${builtins.toJSON p.got}, want ${builtins.toJSON p.want}") bad
      );
  fails = expr: !(tryEval (deepSeq expr expr)).success;
  assertionsHold = s: builtins.all (a: a.assertion) (config s).assertions;
  failedAssertions = s: map (a: a.message) (lib.filter (a: !a.assertion) (config s).assertions);

  base = on { } (nvidia { });
  open = on { } (nvidia {
    open = true;
  });
  datacenter = on { } {
    datacenter.enable = true;
    package = driver;
    nvidiaPersistenced = true;
  };
  legacy = system {
    era = "2025";
    settings.enable = true;
    hardware = nvidia { package = legacyDriver; };
  };
  tuned =
    on
      {
        onBusy = "stop-units";
        stopUnits = [ "ollama.service" ];
        onKernelChange = "fail";
        verify = false;
        settleTimeout = 7;
        extraModuleDirs = [ "/nix/store/gggg-gdrcopy/lib/modules/6.18.1" ];
      }
      (nvidia {
        open = true;
      });
  standalone = on { standalone = true; } (nvidia {
    nvidiaPersistenced = false;
  });
  noDriver = on { } { nvidiaPersistenced = true; };

  flake = import ../../flake.nix;
  outputs = flake.outputs {
    self = outputs;
    nixpkgs = input "2026";
  };
  isDerivation = v: builtins.isAttrs v && v.type or null == "derivation";
  # nix flake check (src/nix/flake.cc): checks, packages, devShells and formatter must be
  # derivations whose drvPath evaluates (checkDerivation: drvInfo->queryDrvPath(), which evaluates
  # every attribute: a build script's interpolated sources included); an overlay must be a
  # function; a NixOS module must evaluate.
  flakeProblems =
    let
      drvEvaluates = v: (tryEval (builtins.deepSeq v.drvPath true)).success;
      notDrv =
        output:
        lib.concatLists (
          lib.mapAttrsToList (
            sys: attrs:
            map (n: "${output}.${sys}.${n}") (
              lib.filter (n: !(isDerivation attrs.${n}) || !(drvEvaluates attrs.${n})) (
                builtins.attrNames attrs
              )
            )
          ) outputs.${output}
        );
    in
    notDrv "checks"
    ++ notDrv "packages"
    ++ notDrv "devShells"
    ++ lib.mapAttrsToList (sys: _: "formatter.${sys}") (
      lib.filterAttrs (_: f: !(isDerivation f)) outputs.formatter
    )
    ++ lib.optional (!builtins.isFunction outputs.overlays.default) "overlays.default"
    ++ lib.optional (!(tryEval outputs.nixosModules.default).success) "nixosModules.default";

  # The VM tests' machine (tests/nixos/machine.nix) evaluated with its specialisations.
  machine =
    args: specialisation:
    let
      m = import ../../tests/nixos/machine.nix args;
      s = system {
        settings = { };
        extra = {
          imports = [ m ];
        }
        // lib.optionalAttrs (specialisation != null) {
          imports = [
            m
            (config (system {
              extra.imports = [ m ];
            })).specialisation.${specialisation}.configuration
          ];
        };
      };
    in
    s;
  machineTree =
    args: generation:
    let
      s = machine args generation;
    in
    {
      dirs = (json s).module_dirs;
      tree = tree s;
      packages = map (p: p.name) (config s).boot.extraModulePackages;
      firmware = map (p: p.name) (config s).hardware.firmware.paths;
      version = (json s).driver_version;
    };
  slurmNode = on {
    slurm = {
      enable = true;
      maxUnavailable = "25%";
      partition = "gpu";
    };
  } (nvidia { });
  busyStop = on {
    onBusy = "stop-units";
    stopUnits = [ "train.service" ];
    verify = true;
  } (nvidia { });
in
[
  {
    # tests/nix-eval/run feeds `configs` to the helper's own validator (rules.validate, which the
    # fast path shares): a key added on one side only fails there.
    name = "the module writes a config for each setting";
    ok = true;
    configs = map json [
      base
      open
      datacenter
      standalone
      busyStop
      slurmNode
    ];
  }
  {
    name = "slurm: the gate's settings reach the helper; off, the key is null";
    ok = expect [
      {
        what = "slurm";
        got = (json slurmNode).slurm;
        want = {
          node = "nixos"; # networking.hostName's default (network-interfaces.nix)
          scontrol = "/run/current-system/sw/bin/scontrol";
          max_unavailable = "25%";
          partition = "gpu";
          settle_s = 5;
          units = [ "slurmd.service" ];
        };
      }
      {
        what = "off";
        got = (json base).slurm;
        want = null;
      }
      {
        what = "a count";
        got =
          (json (
            on {
              slurm = {
                enable = true;
                maxUnavailable = 2;
                nodeName = "gpu07";
              };
            } (nvidia { })
          )).slurm.max_unavailable;
        want = "2";
      }
      {
        what = "an empty host name is refused with words";
        got = lib.any (a: !a.assertion && builtins.match ".*slurm[.]nodeName.*" a.message != null) (
          config (system {
            settings = {
              enable = true;
              slurm.enable = true;
            };
            hardware = nvidia { };
            extra.networking.hostName = "";
          })
        ).assertions;
        want = true;
      }
    ];
  }
  {
    name = "2026 proprietary: module_dirs is the generation's module tree, holding nvidia_x11.mod";
    ok = expect [
      {
        what = "module_dirs";
        got = (json base).module_dirs;
        want = [ (tree base) ];
      }
      {
        what = "mod in the tree";
        got = inTree base driver.mod;
        want = true;
      }
      {
        what = "driver_version";
        got = (json base).driver_version;
        want = "595.44.01";
      }
      {
        what = "kernel_release (modDirVersion)";
        got = (json base).kernel_release;
        want = "6.18.1";
      }
      {
        what = "rollback_dirs";
        got = (json base).rollback_dirs;
        want = [ "/run/booted-system/kernel-modules/lib/modules/6.18.1" ];
      }
      {
        what = "kernel_image (what /run/booted-system/kernel names for the booted generation)";
        got = (json base).kernel_image;
        want = "${(config base).boot.kernelPackages.kernel}/bzImage";
      }
      {
        what = "defaults";
        got = {
          inherit (json base)
            on_busy
            on_kernel_change
            stop_units
            settle_timeout_s
            state_dir
            allowed_prefixes
            ;
        };
        want = {
          on_busy = "defer";
          on_kernel_change = "defer";
          stop_units = [ ];
          settle_timeout_s = 10;
          state_dir = "/run/nvidia-kmod-swap";
          allowed_prefixes = [ "/nix/store/" ];
        };
      }
    ];
  }
  {
    name = "open modules (hardware.nvidia.open = true): the tree holds nvidia_x11.open";
    ok = expect [
      {
        what = "module_dirs";
        got = (json open).module_dirs;
        want = [ (tree open) ];
      }
      {
        what = "open in the tree";
        got = inTree open driver.open;
        want = true;
      }
    ];
  }
  {
    # (The assertions then stop the build, with our message: tests/nix-eval/errors.nix openNull.)
    name = "datacenter, hardware.nvidia.open left null (null from 560 on): the tree and config evaluate, mod";
    ok = expect [
      {
        what = "hardware.nvidia.open";
        got = (config datacenter).hardware.nvidia.open;
        want = null;
      }
      {
        what = "module_dirs";
        got = (json datacenter).module_dirs;
        want = [ (tree datacenter) ];
      }
      {
        what = "mod in the tree";
        got = inTree datacenter driver.mod;
        want = true;
      }
    ];
  }
  {
    name = "pre-2026 nixpkgs: the proprietary modules in nvidia_x11.bin, found in the same tree";
    ok = expect [
      {
        what = "module_dirs";
        got = (json legacy).module_dirs;
        want = [ (tree legacy) ];
      }
      {
        what = "bin in the tree";
        got = inTree legacy legacyDriver.bin;
        want = true;
      }
    ];
  }
  {
    name = "modules: nvidia plus the driver modules this generation loads at boot, no more";
    ok = expect [
      {
        what = "standard (nvidia.nix loads nvidia, nvidia_modeset, nvidia_drm)";
        got = (json base).modules;
        want = [
          "nvidia"
          "nvidia_modeset"
          "nvidia_drm"
        ];
      }
      {
        what = "open (adds nvidia_uvm)";
        got = (json open).modules;
        want = [
          "nvidia"
          "nvidia_uvm"
          "nvidia_modeset"
          "nvidia_drm"
        ];
      }
      {
        what = "headless (videoDrivers without the X server: nvidia.nix loads nothing at boot)";
        got =
          (json (system {
            settings.enable = true;
            hardware = nvidia { };
            extra.services.xserver.enable = lib.mkForce false;
          })).modules;
        want = [ "nvidia" ];
      }
      {
        what = "datacenter (modesetting defaults on, but nothing loads nvidia_drm)";
        got = (json datacenter).modules;
        want = [ "nvidia" ];
      }
      {
        what = "boot.kernelModules as an attrset, and the nvidia-uvm spelling";
        got =
          (json (system {
            settings.enable = true;
            hardware = nvidia { };
            extra.boot.kernelModules = {
              "nvidia-uvm" = true;
              nvidia_peermem = true;
            };
          })).modules;
        want = [
          "nvidia"
          "nvidia_uvm"
          "nvidia_modeset"
          "nvidia_drm"
          "nvidia_peermem"
        ];
      }
    ];
  }
  {
    name = "verify runs the driver's own nvidia-smi (bin output)";
    ok = expect [
      {
        what = "verify_command";
        got = (json base).verify_command;
        want = [
          "${driver.bin}/bin/nvidia-smi"
          "--query-gpu=driver_version"
          "--format=csv,noheader"
        ];
      }
    ];
  }
  {
    name = "every option reaches the JSON config";
    ok = expect [
      {
        what = "module_dirs with extraModuleDirs";
        got = (json tuned).module_dirs;
        want = [
          (tree tuned)
          "/nix/store/gggg-gdrcopy/lib/modules/6.18.1"
        ];
      }
      {
        what = "the rest";
        got = {
          inherit (json tuned)
            on_busy
            stop_units
            on_kernel_change
            verify_command
            settle_timeout_s
            ;
        };
        want = {
          on_busy = "stop-units";
          stop_units = [ "ollama.service" ];
          on_kernel_change = "fail";
          verify_command = null;
          settle_timeout_s = 7;
        };
      }
    ];
  }
  {
    name = "the unit: ExecCondition check, ExecStartPre swap, first and privileged; ExecStart kept";
    ok =
      let
        s = system {
          settings.enable = true;
          hardware = nvidia { };
          extra.systemd.services.nvidia-persistenced.serviceConfig.ExecStartPre = [ "/bin/true" ];
        };
      in
      expect [
        {
          what = "ExecCondition";
          got = (unit s).ExecCondition;
          want = [ "+${helper} --config ${file s} check" ];
        }
        {
          what = "ExecStartPre";
          got = (unit s).ExecStartPre;
          want = [
            "+${helper} --config ${file s} swap"
            "/bin/true"
          ];
        }
        {
          what = "ExecStart";
          got = (unit s).ExecStart;
          want = "${driver.persistenced}/bin/nvidia-persistenced --verbose";
        }
      ];
  }
  {
    name = "issue 11: every GPU unit of the configuration is after the swap, skipped by check, restarted";
    ok =
      let
        s = system {
          settings = {
            enable = true;
            gpuUnits = [ "gpu-power-limit" ];
          };
          hardware = nvidia {
            dynamicBoost.enable = true;
            datacenter.enable = true;
          };
          extra = {
            hardware.nvidia-container-toolkit.enable = true;
            systemd.services.gpu-power-limit.serviceConfig.ExecStart =
              "/run/current-system/sw/bin/nvidia-smi -pl 300";
          };
        };
        units = [
          "nvidia-container-toolkit-cdi-generator"
          "nvidia-powerd"
          "nvidia-fabricmanager"
          "gpu-power-limit"
        ];
        wiring =
          u:
          let
            svc = (config s).systemd.services.${u};
          in
          {
            inherit (svc) after;
            condition = svc.serviceConfig.ExecCondition;
            triggers = map (p: p.outPath) svc.restartTriggers;
            kept = svc.serviceConfig ? ExecStart;
          };
      in
      expect (
        map (u: {
          what = u;
          got = wiring u;
          want = {
            after = [ "nvidia-persistenced.service" ];
            condition = [ "+${helper} --config ${file s} check" ];
            triggers = driverTriggers s;
            kept = true;
          };
        }) units
        ++ [
          {
            what = "gpu_units in the helper's config";
            got = (json s).gpu_units;
            want = map (u: "${u}.service") units;
          }
          {
            what = "swap_unit";
            got = (json s).swap_unit;
            want = "nvidia-persistenced.service";
          }
          {
            what = "no GPU unit is made up when none is enabled";
            got = builtins.filter (u: (config base).systemd.services ? ${u}) units;
            want = [ ];
          }
        ]
      );
  }
  {
    name = "issue 11: a misspelt gpuUnits entry is an assertion, not a unit with nothing to run";
    ok = expect [
      {
        what = "failed assertions";
        got = map (m: builtins.substring 0 60 m) (
          failedAssertions (on { gpuUnits = [ "gpu-power-limit.service" ]; } (nvidia { }))
        );
        want = [ "services.nvidiaKmodSwap.gpuUnits names units that are not de" ];
      }
    ];
  }
  {
    name = "issue 11: a deferred swap finishes by itself (retry timer), the unit's timeout covers the helper";
    ok =
      let
        c = config base;
        retry = c.systemd.services.nvidia-kmod-swap-retry.serviceConfig;
      in
      expect [
        {
          what = "retry service";
          got = retry;
          want = {
            Type = "oneshot";
            ExecStart = "${helper} --config ${file base} retry-deferred";
          };
        }
        {
          what = "retry timer";
          got = c.systemd.timers.nvidia-kmod-swap-retry;
          want = {
            wantedBy = [ "timers.target" ];
            timerConfig = {
              OnActiveSec = 30;
              OnUnitInactiveSec = 30;
            };
          };
        }
        {
          what = "TimeoutStartSec of nvidia-persistenced (lock 60 + 4 x grace 5 + 3 x settle 10 + 2 x verify 60 + 30)";
          got = (unit base).TimeoutStartSec;
          want = 260;
        }
        {
          what = "TimeoutStartSec of the standalone unit";
          got = (config standalone).systemd.services.nvidia-kmod-swap.serviceConfig.TimeoutStartSec;
          want = 260;
        }
        {
          what = "the helper's keys";
          got = {
            inherit (json base) busy_grace_s lock_timeout_s swap_unit;
          };
          want = {
            busy_grace_s = 5;
            lock_timeout_s = 60;
            swap_unit = "nvidia-persistenced.service";
          };
        }
        {
          what = "firmware_path: what activation writes to firmware_class.path (open: with the driver's firmware)";
          got = [
            (json open).firmware_path
            (map (p: p.outPath) (config open).hardware.firmware.paths)
          ];
          want = [
            "${(config open).hardware.firmware}/lib/firmware"
            [ driver.firmware.outPath ]
          ];
        }
        {
          what = "standalone: GPU units follow its own unit";
          got = (json standalone).swap_unit;
          want = "nvidia-kmod-swap.service";
        }
      ];
  }
  {
    name = "a new driver restarts the swap unit and the GPU units, an unrelated update none of them";
    ok =
      let
        gpu = extra: hardware: system {
          settings = {
            enable = true;
            gpuUnits = [ "gpu-power-limit" ];
          };
          inherit hardware;
          extra.imports = [
            {
              hardware.nvidia-container-toolkit.enable = true;
              systemd.services.gpu-power-limit.serviceConfig.ExecStart = "/run/current-system/sw/bin/nvidia-smi -pl 300";
            }
            extra
          ];
        };
        before = gpu { } (nvidia { });
        # A linux-firmware bump and another out-of-tree module (zfs, v4l2loopback) in the tree.
        unrelated = gpu {
          hardware.firmware = [ (fakeDrv "linux-firmware-20261201" { }) ];
          boot.extraModulePackages = [ (fakeDrv "v4l2loopback-0.15.1-6.18.1" { }) ];
        } (nvidia { });
        bumped = gpu { } (nvidia { package = driverOf "595.58.03"; });
        units = [
          "nvidia-persistenced"
          "nvidia-container-toolkit-cdi-generator"
          "gpu-power-limit"
        ];
        # What switch-to-configuration compares: the unit's definition (here: its settings and
        # triggers, which become X-Restart-Triggers).
        unitOf = s: u: {
          inherit ((config s).systemd.services.${u}) serviceConfig;
          triggers = map (p: p.outPath or p) (config s).systemd.services.${u}.restartTriggers;
        };
        same = a: b: map (unitOf a) units == map (unitOf b) units;
      in
      expect [
        {
          what = "the module tree and the firmware changed";
          got = [
            ((json before).module_dirs != (json unrelated).module_dirs)
            ((json before).firmware_path != (json unrelated).firmware_path)
          ];
          want = [
            true
            true
          ];
        }
        {
          what = "unrelated update: every GPU unit as it was";
          got = same before unrelated;
          want = true;
        }
        {
          what = "driver bump: each unit changed";
          got = map (u: unitOf before u != unitOf bumped u) units;
          want = [
            true
            true
            true
          ];
        }
        {
          what = "triggers";
          got = (unitOf before "nvidia-persistenced").triggers;
          want = driverTriggers before;
        }
      ];
  }
  {
    # The helper compares stop_units with a holder's unit, which has its suffix (issue 22).
    name = "stopUnits: names without .service get it, unit names are kept";
    ok = expect [
      {
        what = "stop_units";
        got =
          (json (
            on {
              onBusy = "stop-units";
              stopUnits = [
                "ollama"
                "train.service"
                "jobs.target"
              ];
            } (nvidia { })
          )).stop_units;
        want = [
          "ollama.service"
          "train.service"
          "jobs.target"
        ];
      }
    ];
  }
  {
    name = "standalone: own oneshot unit, nvidia-persistenced untouched";
    ok = expect [
      {
        what = "ExecStart";
        got = (config standalone).systemd.services.nvidia-kmod-swap.serviceConfig.ExecStart;
        want = "${helper} --config ${file standalone} swap";
      }
      {
        what = "no nvidia-persistenced";
        got = (config standalone).systemd.services ? nvidia-persistenced;
        want = false;
      }
      {
        what = "assertions";
        got = failedAssertions standalone;
        want = [ ];
      }
    ];
  }
  {
    # Issue 23: graphics.nix's driver links (its tmpfiles L+ rules) are what a pin to this driver
    # restores; nvidia-smi is the `bin` output's.
    name = "the config names this generation's driver links and nvidia-smi";
    ok =
      let
        desktop = json base;
        thirtyTwo = json (system {
          settings.enable = true;
          hardware = nvidia { };
          extra.hardware.graphics.enable32Bit = true;
        });
        env = s: (config s).systemd.tmpfiles.settings.graphics-driver."/run/opengl-driver"."L+".argument;
      in
      expect [
        {
          what = "a desktop (the X server enables hardware.graphics)";
          got = desktop.driver_links;
          want = {
            "/run/opengl-driver" = env base;
          };
        }
        {
          what = "its environment holds the driver's libraries (nvidia.nix: extraPackages = [ nvidia_x11.out ])";
          got = lib.elem driver.outPath (map (p: p.outPath) (config base).hardware.graphics.extraPackages);
          want = true;
        }
        {
          what = "enable32Bit adds the 32-bit link";
          got = builtins.attrNames thirtyTwo.driver_links;
          want = [
            "/run/opengl-driver"
            "/run/opengl-driver-32"
          ];
        }
        {
          what = "a headless datacenter machine has no driver links to pin";
          got = (json datacenter).driver_links;
          want = null;
        }
        {
          what = "nvidia-smi";
          got = desktop.nvidia_smi;
          want = "${driver.bin}/bin/nvidia-smi";
        }
        {
          # Issue 24: the module files' facts, computed at build time (`nvidia-kmod-swap facts`).
          what = "module facts";
          got = map (p: lib.hasSuffix "-nvidia-kmod-swap-module-facts" p) desktop.module_facts;
          want = [ true ];
        }
      ];
  }
  {
    # Issue 23: the pin runs in every switch that changes a tmpfiles rule, before
    # systemd-tmpfiles-resetup re-applies graphics.nix's link (switch-to-configuration-ng restarts
    # sysinit-reactivation.target before it starts any other unit).
    name = "the pin unit runs in the switch, before systemd-tmpfiles-resetup";
    ok =
      let
        svc = (config base).systemd.services.nvidia-kmod-swap-pin;
      in
      expect [
        {
          what = "wiring";
          got = {
            inherit (svc) requiredBy before;
            triggers = map (p: p.outPath) svc.restartTriggers;
            default = svc.unitConfig.DefaultDependencies;
            start = svc.serviceConfig.ExecStart;
          };
          want = {
            requiredBy = [ "sysinit-reactivation.target" ];
            before = [
              "systemd-tmpfiles-resetup.service"
              "sysinit-reactivation.target"
            ];
            triggers = [ (config base).environment.etc."tmpfiles.d".source.outPath ];
            default = false;
            start = "${helper} --config ${file base} pin";
          };
        }
      ];
  }
  {
    # Issue 23: RuntimeDirectory=cdi is removed when the generator stops (systemd.exec(5),
    # RuntimeDirectoryPreserve= default no); kept, containers keep the loaded driver's spec.
    name = "the CDI generator's spec survives its stop";
    ok =
      let
        withToolkit = system {
          settings.enable = true;
          hardware = nvidia { };
          extra.hardware.nvidia-container-toolkit.enable = true;
        };
      in
      expect [
        {
          what = "RuntimeDirectoryPreserve";
          got =
            (config withToolkit)
            .systemd.services.nvidia-container-toolkit-cdi-generator.serviceConfig.RuntimeDirectoryPreserve;
          want = "yes";
        }
        {
          what = "nothing without the toolkit";
          got = (config base).systemd.services ? nvidia-container-toolkit-cdi-generator;
          want = false;
        }
      ];
  }
  {
    name = "disabled: the module adds nothing";
    ok =
      let
        s = system { hardware = nvidia { }; };
      in
      expect [
        {
          what = "config file";
          got = (config s).environment.etc ? "nvidia-kmod-swap/config.json";
          want = false;
        }
        {
          what = "unit";
          got = (config s).systemd.services.nvidia-persistenced.serviceConfig ? ExecCondition;
          want = false;
        }
      ];
  }
  {
    name = "assertion: hooks into nvidia-persistenced or runs standalone";
    ok = expect [
      {
        what = "holds by default";
        got = failedAssertions base;
        want = [ ];
      }
      {
        what = "fails without nvidiaPersistenced";
        got = assertionsHold (
          on { } (nvidia {
            nvidiaPersistenced = false;
          })
        );
        want = false;
      }
    ];
  }
  {
    name = "assertion: nvidiaPersistenced without the driver enabled (no unit to start) is named";
    ok = expect [
      {
        what = "assertions hold";
        got = assertionsHold noDriver;
        want = false;
      }
      {
        what = "message names the missing unit";
        got = builtins.any (lib.hasPrefix "services.nvidiaKmodSwap: hardware.nvidia.nvidiaPers") (
          map lib.trim (failedAssertions noDriver)
        );
        want = true;
      }
    ];
  }
  {
    name = "assertion: a package without version is not an NVIDIA driver";
    ok = expect [
      {
        what = "assertions hold";
        got = assertionsHold (
          on {
            nvidiaPackage = fakeDrv "hello-2.12" { };
          } (nvidia { })
        );
        want = false;
      }
    ];
  }
  {
    name = "types: bad values are rejected (onBusy, settleTimeout, stopUnits, unknown, open)";
    ok = expect [
      {
        what = "onBusy = kill";
        got = fails (json (on { onBusy = "kill"; } (nvidia { })));
        want = true;
      }
      {
        what = "settleTimeout = 0";
        got = fails (json (on { settleTimeout = 0; } (nvidia { })));
        want = true;
      }
      {
        what = "stopUnits = a string";
        got = fails (json (on { stopUnits = "ollama.service"; } (nvidia { })));
        want = true;
      }
      {
        what = "unknown option";
        got = fails (json (on { noSuchOption = true; } (nvidia { })));
        want = true;
      }
      {
        what = "hardware.nvidia.open = \"yes\"";
        got = fails (
          json (
            on { } (nvidia {
              open = "yes";
            })
          )
        );
        want = true;
      }
    ];
  }
  {
    name = "options: the documented set";
    ok = expect [
      {
        what = "services.nvidiaKmodSwap";
        got = builtins.attrNames base.options.services.nvidiaKmodSwap;
        want = [
          "busyGrace"
          "enable"
          "extraModuleDirs"
          "gpuUnits"
          "lockTimeout"
          "nvidiaPackage"
          "onBusy"
          "onKernelChange"
          "package"
          "retryInterval"
          "settleTimeout"
          "slurm"
          "standalone"
          "stopUnits"
          "verify"
        ];
      }
    ];
  }
  {
    name = "flake outputs as nix flake check sees them: checks, packages, ... are derivations";
    ok = expect [
      {
        what = "not acceptable";
        got = flakeProblems;
        want = [ ];
      }
      {
        what = "checks.x86_64-linux";
        got = builtins.attrNames outputs.checks.x86_64-linux;
        want = [
          "busy-defer"
          "gpu-units"
          "linters"
          "module-eval"
          "package"
          "rollback"
          "slurm"
          "swap"
          "swap-legacy-layout"
          "swap-open"
          "userspace"
        ];
      }
    ];
  }
  {
    name = "tests/nixos/module-eval.nix (a flake check) passes against the doubled NixOS";
    ok = expect [
      {
        what = "derivation";
        got = isDerivation outputs.checks.x86_64-linux.module-eval;
        want = true;
      }
    ];
  }
  {
    # tests/nixos/slurm-node.nix against services.slurm's options (nixos-double.nix); the test
    # driver names the machine's host "machine" (nixos/lib/testing/nodes.nix).
    name = "VM test machine with slurm-node.nix: the gate names the node slurm.conf knows";
    ok =
      let
        s = system {
          extra = {
            imports = [
              (import ../../tests/nixos/machine.nix { })
              ../../tests/nixos/slurm-node.nix
            ];
            networking.hostName = "machine";
          };
        };
      in
      expect [
        {
          what = "slurm";
          got = (json s).slurm;
          want = {
            node = "machine";
            scontrol = "/run/current-system/sw/bin/scontrol";
            max_unavailable = "1";
            partition = null;
            settle_s = 1;
            units = [ "slurmd.service" ];
          };
        }
        {
          what = "slurm.conf's node";
          got = builtins.head (config s).services.slurm.nodeName;
          want = "machine CPUs=1 Gres=gpu:1 State=UNKNOWN";
        }
      ];
  }
  {
    name = "VM test machine: each specialisation's module tree has its own driver (mod, open, bin)";
    ok =
      let
        base26 = machineTree { } null;
        new26 = machineTree { } "new";
        openNew = machineTree { open = true; } "new";
        legacyNew = machineTree { layout = "legacy"; } "new";
      in
      expect [
        {
          what = "booted: old mod";
          got = base26.packages;
          want = [ "fake-nvidia-kernel-modules-6.18.1-580.95.05" ];
        }
        {
          what = "new: new mod, new version, its own tree";
          got = [
            new26.packages
            new26.version
            (new26.dirs == [ new26.tree ])
            (new26.tree != base26.tree)
          ];
          want = [
            [ "fake-nvidia-kernel-modules-6.18.1-580.105.08" ]
            "580.105.08"
            true
            true
          ];
        }
        {
          what = "open";
          got = openNew.packages;
          want = [ "fake-nvidia-open-6.18.1-580.105.08" ];
        }
        {
          what = "legacy layout: the bin output";
          got = legacyNew.packages;
          want = [ "fake-nvidia-x11-580.105.08-bin" ];
        }
      ];
  }
  {
    # udev.nix compresses each hardware.firmware package with zstd (kernel >= 5.19) unless it has
    # compressFirmware = false, as nvidia_x11 has: the rollback story's firmware check reads
    # nvidia/<version>/gsp_ga10x.bin, which a compressed copy would not have.
    name = "VM test machine: the driver's GSP firmware reaches the firmware path uncompressed";
    ok = expect [
      {
        what = "booted";
        got = (machineTree { } null).firmware;
        want = [ "fake-nvidia-x11-580.95.05-firmware" ];
      }
      {
        what = "new";
        got = (machineTree { } "new").firmware;
        want = [ "fake-nvidia-x11-580.105.08-firmware" ];
      }
    ];
  }
]
