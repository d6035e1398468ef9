# NixOS VM tests: a real NixOS generation switch with the fake NVIDIA driver, built for the test
# machine's kernel. The same stories as tests/vm/scenarios (02, 05, 09, 14), told with
# specialisations and switch-to-configuration instead of the Debian test bed's switch-driver.
{ testers }:

let
  old = "570.124.04";
  new = "570.133.07";

  machine =
    {
      config,
      lib,
      pkgs,
      ...
    }:
    let
      kernelPackages = config.boot.kernelPackages;
      drivers = {
        old = kernelPackages.callPackage ./fake-driver.nix { version = old; };
        new = kernelPackages.callPackage ./fake-driver.nix { version = new; };
        uvm-fails = kernelPackages.callPackage ./fake-driver.nix {
          version = new;
          failInit = "NVIDIA_UVM";
        };
      };
      # A generation whose system profile carries another driver, as a driver bump would.
      withDriver = driver: {
        services.nvidiaKmodSwap.nvidiaPackage = lib.mkForce driver;
        systemd.services.nvidia-persistenced.serviceConfig.ExecStart =
          lib.mkForce "${driver.bin}/bin/nvidia-persistenced --verbose";
      };
    in
    {
      imports = [ ../../nixos/module.nix ];

      # What hardware.nvidia does for the booted driver: modules in the kernel's tree, loaded at boot.
      boot.extraModulePackages = [ drivers.old.bin ];
      boot.kernelModules = [
        "nvidia"
        "nvidia_modeset"
        "nvidia_uvm"
        "nvidia_drm"
      ];
      hardware.nvidia.nvidiaPersistenced = true;
      hardware.nvidia.modesetting.enable = true;
      services.udev.extraRules = ''
        KERNEL=="nvidia", RUN+="${pkgs.runtimeShell} -c 'mknod -m 666 /dev/nvidiactl c 195 255'"
        KERNEL=="nvidia", RUN+="${pkgs.runtimeShell} -c 'for i in $$(cat /proc/driver/nvidia/gpus/*/information | grep Minor | cut -d \  -f 4); do mknod -m 666 /dev/nvidia$${i} c 195 $${i}; done'"
        KERNEL=="nvidia_modeset", RUN+="${pkgs.runtimeShell} -c 'mknod -m 666 /dev/nvidia-modeset c 195 254'"
        KERNEL=="nvidia_uvm", RUN+="${pkgs.runtimeShell} -c 'mknod -m 666 /dev/nvidia-uvm c $$(grep nvidia-uvm /proc/devices | cut -d \  -f 1) 0'"
        KERNEL=="nvidia_uvm", RUN+="${pkgs.runtimeShell} -c 'mknod -m 666 /dev/nvidia-uvm-tools c $$(grep nvidia-uvm /proc/devices | cut -d \  -f 1) 1'"
      '';
      # The unit as hardware.nvidia.nvidiaPersistenced defines it (hardware.nvidia itself wants a
      # real, unfree driver and GPU).
      systemd.services.nvidia-persistenced = {
        description = "NVIDIA Persistence Daemon";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Type = "forking";
          Restart = "always";
          PIDFile = "/var/run/nvidia-persistenced/nvidia-persistenced.pid";
          ExecStart = "${drivers.old.bin}/bin/nvidia-persistenced --verbose";
          ExecStopPost = "${pkgs.coreutils}/bin/rm -rf /var/run/nvidia-persistenced";
        };
      };
      # A GPU user for the busy-GPU story; not started at boot.
      systemd.services.cuda-job.serviceConfig.ExecStart =
        "${pkgs.bash}/bin/bash -c 'exec 3<>/dev/nvidia0; exec sleep infinity'";

      services.nvidiaKmodSwap = {
        enable = true;
        nvidiaPackage = drivers.old;
      };
      specialisation = lib.mapAttrs (_: driver: { configuration = withDriver driver; }) {
        inherit (drivers) new uvm-fails;
      };
    };
in
{
  nvidia-kmod-swap = testers.runNixOSTest {
    name = "nvidia-kmod-swap";
    nodes.machine = machine;
    testScript = ''
      OLD, NEW = "${old}", "${new}"
      MODULES = ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]


      def versions():
          return {m: machine.succeed(f"cat /sys/module/{m}/version").strip() for m in MODULES}


      def switch(generation):
          """switch-to-configuration of the booted system or one of its specialisations."""
          path = "/run/booted-system" + ("" if generation == "base" else f"/specialisation/{generation}")
          return machine.execute(f"{path}/bin/switch-to-configuration test")


      machine.wait_for_unit("nvidia-persistenced.service")
      assert set(versions().values()) == {OLD}, versions()

      with subtest("a driver bump swaps the modules live and the unit starts"):
          rc, out = switch("new")
          assert rc == 0, out
          machine.wait_for_unit("nvidia-persistenced.service")
          assert set(versions().values()) == {NEW}, versions()
          machine.succeed("test \"$(stat -c %t:%T /dev/nvidiactl)\" = c3:ff")
          machine.fail("journalctl -k | grep -q 'API mismatch'")

      with subtest("rolling the generation back swaps back"):
          rc, out = switch("base")
          assert rc == 0, out
          machine.wait_for_unit("nvidia-persistenced.service")
          assert set(versions().values()) == {OLD}, versions()

      with subtest("a busy GPU defers: nothing unloaded, the unit skipped, not failed"):
          machine.succeed("systemctl start cuda-job.service")
          machine.wait_until_succeeds("ls -l /proc/$(systemctl show -P MainPID cuda-job.service)/fd | grep -q /dev/nvidia0")
          rc, out = switch("new")
          assert rc == 0, out
          assert set(versions().values()) == {OLD}, versions()
          machine.succeed("test \"$(systemctl show -P ActiveState nvidia-persistenced)\" = inactive")
          machine.succeed("journalctl -u nvidia-persistenced | grep -q 'cuda-job.service'")
          machine.succeed("systemctl stop cuda-job.service")
          machine.succeed("systemctl restart nvidia-persistenced.service")
          assert set(versions().values()) == {NEW}, versions()
          switch("base")
          machine.wait_for_unit("nvidia-persistenced.service")

      with subtest("a module that fails to load is rolled back and the switch fails"):
          rc, out = switch("uvm-fails")
          assert rc != 0, out
          assert set(versions().values()) == {OLD}, versions()
          machine.succeed("journalctl -u nvidia-persistenced | grep -q 'rolled back'")
          machine.succeed("test -c /dev/nvidia-uvm")
    '';
  };
}
