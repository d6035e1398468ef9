# Each check is { name; ok; } and evaluates the module through eval-module.nix.
let
  eval = import ./eval-module.nix;
  driver = {
    outPath = "/nix/store/dddddddddddddddddddddddddddddddd-nvidia-x11-570.133.07";
    version = "570.133.07";
    bin = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nvidia-x11-570.133.07-bin";
    open = "/nix/store/oooooooooooooooooooooooooooooooo-nvidia-open-570.133.07";
  };
  hw = extra: { package = driver; nvidiaPersistenced = true; } // extra;
  on = settings: extra: eval { settings = { enable = true; } // settings; hardware = hw extra; };

  base = on { } { };
  json = r: builtins.fromJSON r.config.environment.etc."nvidia-kmod-swap/config.json".source.text;
  unit = r: r.config.systemd.services.nvidia-persistenced.serviceConfig;
  file = r: r.config.environment.etc."nvidia-kmod-swap/config.json".source.outPath;
  helper = "/nix/store/hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh-nvidia-kmod-swap-0.1.0/bin/nvidia-kmod-swap";

  tuned = on {
    onBusy = "stop-units";
    stopUnits = [ "ollama.service" ];
    onKernelChange = "fail";
    verify = false;
    settleTimeout = 7;
    extraModuleDirs = [ "/nix/store/gggggggggggggggggggggggggggggggg-gdrcopy/lib/modules/6.12.8-zen1" ];
  } { open = true; modesetting.enable = true; };
  standalone = on { standalone = true; } { nvidiaPersistenced = false; };
  fails = expr: !(builtins.tryEval (builtins.deepSeq expr expr)).success;
  assertionsHold = r: builtins.all (a: a.assertion) r.config.assertions;
in
[
  {
    name = "defaults: version, modDirVersion (not the package version), the bin tree";
    ok =
      let j = json base; in
      j.driver_version == "570.133.07"
      && j.kernel_release == "6.12.8-zen1"
      && j.module_dirs == [ "${driver.bin}/lib/modules/6.12.8-zen1" ]
      && j.rollback_dirs == [ "/run/booted-system/kernel-modules/lib/modules/6.12.8-zen1" ]
      && j.modules == [ "nvidia" "nvidia_modeset" "nvidia_uvm" ]
      && j.on_busy == "defer" && j.on_kernel_change == "defer" && j.stop_units == [ ]
      && j.settle_timeout_s == 10 && j.state_dir == "/run/nvidia-kmod-swap"
      && j.allowed_prefixes == [ "${builtins.storeDir}/" ];
  }
  {
    name = "verify uses the driver's own nvidia-smi";
    ok = (json base).verify_command == [ "${driver.bin}/bin/nvidia-smi" "--query-gpu=driver_version" "--format=csv,noheader" ];
  }
  {
    name = "every option reaches the JSON config (open tree, modesetting, stop-units, fail, no verify, timeout, extra dirs)";
    ok =
      let j = json tuned; in
      j.module_dirs == [ "${driver.open}/lib/modules/6.12.8-zen1" "/nix/store/gggggggggggggggggggggggggggggggg-gdrcopy/lib/modules/6.12.8-zen1" ]
      && j.modules == [ "nvidia" "nvidia_modeset" "nvidia_uvm" "nvidia_drm" ]
      && j.on_busy == "stop-units" && j.stop_units == [ "ollama.service" ]
      && j.on_kernel_change == "fail" && j.verify_command == null && j.settle_timeout_s == 7;
  }
  {
    name = "the unit: ExecCondition runs check, ExecStartPre runs swap, both first and privileged";
    ok =
      (unit base).ExecCondition == [ "+${helper} --config ${file base} check" ]
      && (unit base).ExecStartPre == [ "+${helper} --config ${file base} swap" ];
  }
  {
    name = "a new config (new driver) restarts the unit";
    ok = base.config.systemd.services.nvidia-persistenced.restartTriggers == [ base.config.environment.etc."nvidia-kmod-swap/config.json".source ];
  }
  {
    name = "standalone: own oneshot unit, nvidia-persistenced untouched";
    ok =
      standalone.config.systemd.services.nvidia-kmod-swap.serviceConfig.ExecStart == "${helper} --config ${file standalone} swap"
      && !(standalone.config.systemd.services ? nvidia-persistenced)
      && assertionsHold standalone;
  }
  {
    name = "disabled: the module adds nothing";
    ok = (eval { hardware = hw { }; }).config == { };
  }
  {
    name = "assertion: needs nvidia-persistenced or standalone";
    ok = assertionsHold base && !(assertionsHold (on { } { nvidiaPersistenced = false; }));
  }
  {
    name = "assertion: a package without version/bin is not an NVIDIA driver";
    ok = !(assertionsHold (on { nvidiaPackage = { outPath = "/nix/store/x-hello"; }; } { }));
  }
  {
    name = "types: bad values are rejected (onBusy = kill, settleTimeout = 0, stopUnits = a string)";
    ok =
      fails (json (on { onBusy = "kill"; } { }))
      && fails (json (on { settleTimeout = 0; } { }))
      && fails (json (on { stopUnits = "ollama.service"; } { }))
      && fails (json (on { noSuchOption = true; } { }));
  }
  {
    name = "options: the documented set";
    ok = base.options == [ "enable" "extraModuleDirs" "nvidiaPackage" "onBusy" "onKernelChange" "package" "settleTimeout" "standalone" "stopUnits" "verify" ];
  }
]
