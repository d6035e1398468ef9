# The test machine of every NixOS VM test: a NixOS system with the fake NVIDIA driver
# (fake-driver.nix) wired the way hardware.nvidia wires the real one, and specialisations that
# carry another driver, as a driver bump does. hardware.nvidia itself wants the unfree driver and a
# GPU, so its parts that matter here are restated (nixos/modules/hardware/video/nvidia.nix): the
# module package in boot.extraModulePackages (`if useOpenModules then [ open ] else [ mod ]`; `bin`
# before 2026), the udev rules that make /dev/nvidia*, and the nvidia-persistenced unit.
{
  # "2026" (modules in `mod`/`open`) or "legacy" (proprietary modules in `bin`): fake-driver.nix.
  layout ? "2026",
  # hardware.nvidia.open: load the `open` modules instead.
  open ? false,
}:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  versions = import ./versions.nix;
  fakeDriver =
    args: config.boot.kernelPackages.callPackage ./fake-driver.nix ({ inherit layout; } // args);
  drivers = {
    old = fakeDriver { version = versions.old; };
    new = fakeDriver { version = versions.new; };
    uvm-fails = fakeDriver {
      version = versions.new;
      failInit = "NVIDIA_UVM";
    };
  };
  moduleTree =
    driver:
    if open then
      driver.open
    else if driver ? mod then
      driver.mod
    else
      driver.bin;
  persistencedUnit = driver: {
    ExecStart = "${lib.getExe driver.persistenced} --verbose";
  };
  # A user's GPU unit (a power limit set with nvidia-smi): its command is the generation's driver,
  # so a bump changes the unit, as it changes nvidia-container-toolkit-cdi-generator's.
  powerLimitUnit = driver: {
    ExecStart = "${pkgs.runtimeShell} -c '${lib.getBin driver}/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader > /run/gpu-power-limit.out'";
  };
  # A generation whose system profile carries another driver, as a driver bump would.
  withDriver = driver: {
    boot.extraModulePackages = lib.mkForce [ (moduleTree driver) ];
    hardware.graphics.extraPackages = lib.mkForce [ driver.out ];
    hardware.firmware = lib.mkForce [ driver.firmware ];
    services.nvidiaKmodSwap.nvidiaPackage = lib.mkForce driver;
    systemd.services.nvidia-persistenced.serviceConfig = lib.mapAttrs (_: lib.mkForce) (
      persistencedUnit driver
    );
    systemd.services.gpu-power-limit.serviceConfig = lib.mapAttrs (_: lib.mkForce) (
      powerLimitUnit driver
    );
  };
in
{
  imports = [ ../../nixos/module.nix ];

  boot.extraModulePackages = [ (moduleTree drivers.old) ];
  # The driver's GSP firmware (nvidia.nix: hardware.firmware = lib.optional cfg.open
  # nvidia_x11.firmware; the fake needs it either way), which activation puts on the firmware path.
  hardware.firmware = [ drivers.old.firmware ];
  boot.kernelModules = [
    "nvidia"
    "nvidia_modeset"
    "nvidia_drm"
    "nvidia_uvm"
  ];
  hardware.nvidia.nvidiaPersistenced = true;
  services.udev.extraRules = ''
    KERNEL=="nvidia", RUN+="${pkgs.runtimeShell} -c 'mknod -m 666 /dev/nvidiactl c 195 255'"
    KERNEL=="nvidia", RUN+="${pkgs.runtimeShell} -c 'for i in $$(cat /proc/driver/nvidia/gpus/*/information | grep Minor | cut -d \  -f 4); do mknod -m 666 /dev/nvidia$${i} c 195 $${i}; done'"
    KERNEL=="nvidia_modeset", RUN+="${pkgs.runtimeShell} -c 'mknod -m 666 /dev/nvidia-modeset c 195 254'"
    KERNEL=="nvidia_uvm", RUN+="${pkgs.runtimeShell} -c 'mknod -m 666 /dev/nvidia-uvm c $$(grep nvidia-uvm /proc/devices | cut -d \  -f 1) 0'"
    KERNEL=="nvidia_uvm", RUN+="${pkgs.runtimeShell} -c 'mknod -m 666 /dev/nvidia-uvm-tools c $$(grep nvidia-uvm /proc/devices | cut -d \  -f 1) 1'"
  '';
  systemd.services.nvidia-persistenced = {
    description = "NVIDIA Persistence Daemon";
    wantedBy = [ "multi-user.target" ];
    serviceConfig = {
      Type = "forking";
      Restart = "always";
      PIDFile = "/var/run/nvidia-persistenced/nvidia-persistenced.pid";
      ExecStopPost = "${pkgs.coreutils}/bin/rm -rf /var/run/nvidia-persistenced";
    }
    // persistencedUnit drivers.old;
  };
  # nvidia.nix's Common block: the driver's libraries in /run/opengl-driver (graphics.nix's real
  # tmpfiles rule), where programs built with addDriverRunpath find them.
  hardware.graphics = {
    enable = true;
    extraPackages = [ drivers.old.out ];
  };
  environment.systemPackages = [
    pkgs.kmod # modinfo, for the stories' checks
    drivers.old.client # gpu-client: a GPU program started while a swap waits (issue 23)
  ];
  # A GPU user for the busy-GPU story; not started at boot.
  systemd.services.cuda-job.serviceConfig.ExecStart =
    "${pkgs.bash}/bin/bash -c 'exec 3<>/dev/nvidia0; exec sleep infinity'";

  systemd.services.gpu-power-limit = {
    wantedBy = [ "multi-user.target" ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
    }
    // powerLimitUnit drivers.old;
  };

  services.nvidiaKmodSwap = {
    enable = true;
    nvidiaPackage = drivers.old;
    gpuUnits = [ "gpu-power-limit" ];
    retryInterval = 2; # the deferred-finishes story waits for it
  };
  specialisation = lib.mapAttrs (_: driver: { configuration = withDriver driver; }) {
    inherit (drivers) new uvm-fails;
  };
}
