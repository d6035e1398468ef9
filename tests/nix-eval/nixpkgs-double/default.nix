# A TEST DOUBLE of nixpkgs for evaluating our flake and modules without nixpkgs: what
# `import nixpkgs { system; overlays; }` returns, as far as our Nix files use it. Packages are
# derivation-shaped attrsets (type = "derivation", outPath, name; passthru merged in, as stdenv's
# make-derivation.nix does with `inherit passthru` plus `// passthru`); callPackage is
# lib/customisation.nix's (it adds override/overrideDerivation to what it returns);
# testers.runNixOSTest returns a derivation (pkgs/build-support/testers/default.nix -> nixos.runTest
# -> config.test, a lazyDerivation); aggregateModules is a buildEnv named "kernel-modules"
# (pkgs/os-specific/linux/kmod/aggregator.nix). Nothing here builds anything.
{
  system ? "x86_64-linux",
  overlays ? [ ],
  config ? { },
  # The lib to use: the double, or a real nixpkgs lib (tests/nix-eval/run --real-lib).
  lib ? import ../lib-double.nix,
}:

let
  inherit (builtins) foldl' hashString substring;

  identity =
    attrs:
    let
      plain =
        v:
        if builtins.isAttrs v && v ? outPath then
          v.outPath
        else if builtins.isString v || builtins.isInt v || builtins.isBool v then
          v
        else
          null;
    in
    builtins.toJSON (
      builtins.mapAttrs (_: v: if builtins.isList v then map plain v else plain v) (
        removeAttrs attrs [
          "passthru"
          "meta"
        ]
      )
    );

  drv =
    attrs:
    let
      name = attrs.name or "${attrs.pname}-${attrs.version}";
      # Like a real store path, the hash depends on the inputs (names, strings, other paths).
      outPath = "/nix/store/${substring 0 32 (hashString "sha256" (identity attrs))}-${name}";
      passthru = attrs.passthru or { };
      self =
        removeAttrs attrs [ "passthru" ]
        // {
          type = "derivation";
          inherit name outPath passthru;
          # As a real .drv's, from every attribute: forcing it (nix flake check does) evaluates them.
          drvPath = "/nix/store/${substring 0 32 (hashString "sha256" "drv-${identity attrs}")}-${name}.drv";
          out = self;
          outputName = "out";
        }
        // passthru;
    in
    self;

  # A derivation with more outputs: each output is a derivation of its own name.
  multi =
    attrs: outputs:
    let
      main = drv attrs;
    in
    main
    // lib.genAttrs outputs (o: drv (attrs // { name = "${main.name}-${o}"; }))
    // {
      inherit outputs;
    };

  base =
    final:
    let
      callPackage = lib.callPackageWith final;
      kernel =
        multi
          {
            pname = "linux";
            version = "6.18.1";
            modDirVersion = "6.18.1";
            moduleBuildDependencies = [ ];
            makeFlags = [ "O=$(buildRoot)" ];
          }
          [
            "modules"
            "dev"
          ];
      kernelPackages = lib.makeOverridable (_: {
        inherit kernel;
        # pkgs/top-level/linux-kernels.nix packagesFor: the scope's callPackage and the flags
        # out-of-tree module builds use since Linux 6.13.
        callPackage = lib.callPackageWith (final // kernelPackages);
        # pkgs/os-specific/linux/nvidia-x11/default.nix: the drivers hardware.nvidia.package
        # defaults to (stable; dc with datacenter.enable), shaped like the 2026 nvidia_x11.
        nvidiaPackages =
          lib.genAttrs
            [
              "stable"
              "dc"
            ]
            (
              flavour:
              multi
                {
                  pname = "nvidia-${if flavour == "dc" then "dc" else "x11"}";
                  version = "580.95.05";
                  # generic.nix (NixOS/nixpkgs 37f8b96b): `inherit version useGLVND useProfiles`
                  # are derivation attributes; passthru as below.
                  useGLVND = true;
                  useProfiles = true;
                  passthru = {
                    compressFirmware = false;
                    ibtSupport = true;
                    settings = drv { name = "nvidia-settings-580.95.05"; };
                    fabricmanager = drv {
                      name = "fabricmanager-580.95.05";
                      meta.mainProgram = "nv-fabricmanager";
                    };
                    mod = drv { name = "nvidia-kernel-modules-6.18.1-580.95.05"; };
                    open = drv { name = "nvidia-open-6.18.1-580.95.05"; };
                    persistenced = drv {
                      name = "nvidia-persistenced-580.95.05";
                      meta.mainProgram = "nvidia-persistenced";
                    };
                  };
                }
                [
                  "bin"
                  "firmware"
                ]
            );
        kernelModuleMakeFlags = [
          "CC=cc"
          "KBUILD_OUTPUT=${kernel.dev}/lib/modules/${kernel.modDirVersion}/build"
        ];
      }) { };
    in
    {
      inherit lib callPackage;
      pkgs = final; # nixpkgs has itself as pkgs.pkgs
      path = ./.;
      stdenv = {
        hostPlatform = {
          inherit system;
          isLinux = true;
          isi686 = false;
        };
        mkDerivation =
          attrs:
          let
            a = if builtins.isFunction attrs then attrs { } else attrs;
          in
          if a ? outputs then multi a (lib.subtractLists [ "out" ] a.outputs) else drv a;
      };
      # pkgs/build-support/trivial-builders: the script is the derivation's buildCommand, so it is
      # evaluated (with every path and derivation it interpolates) when the derivation is.
      runCommand =
        name: env: buildCommand:
        drv (env // { inherit name buildCommand; });
      runCommandCC = final.runCommand;
      writeText = name: text: drv { inherit name text; };
      # trivial-builders: writeTextDir NAME-with-path TEXT is a directory holding that file;
      # symlinkJoin a derivation of links to the PATHS' files.
      writeTextDir =
        path: text:
        drv {
          name = baseNameOf path;
          inherit path text;
        };
      symlinkJoin =
        {
          name,
          paths,
          ...
        }:
        drv { inherit name paths; };
      # What hardware.graphics links by default (nixos/modules/hardware/graphics.nix: package =
      # pkgs.mesa, package32 = pkgs.pkgsi686Linux.mesa, and pkgs.libGL in both environments).
      mesa = drv { name = "mesa-25.1.7"; };
      libGL = drv { name = "libglvnd-1.7.0"; };
      pkgsi686Linux = {
        mesa = drv { name = "mesa-i686-unknown-linux-gnu-25.1.7"; };
        libGL = drv { name = "libglvnd-i686-unknown-linux-gnu-1.7.0"; };
      };
      runtimeShell = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-bash-5.3/bin/bash";
      python3Packages = {
        buildPythonApplication = attrs: drv attrs;
        setuptools = drv { name = "python3.13-setuptools-80.9.0"; };
        pyudev = drv { name = "python3.13-pyudev-0.24.3"; };
        packaging = drv { name = "python3.13-packaging-25.0"; };
        # pkgs/development/python-modules/pyelftools/default.nix (0.32)
        pyelftools = drv { name = "python3.13-pyelftools-0.32"; };
        systemd-python = drv { name = "python3.13-systemd-python-235"; };
        zstandard = drv { name = "python3.13-zstandard-0.23.0"; };
        pytestCheckHook = drv { name = "pytest-check-hook"; };
        mypy = drv { name = "python3.13-mypy-1.17.1"; };
        ruff = drv { name = "python3.13-ruff-0.12.11"; };
      };
      # pkgs/development/interpreters/python/with-packages.nix: an env of the chosen packages.
      python3.withPackages =
        f:
        drv {
          name = "python3-3.13.7-env";
          paths = f final.python3Packages;
        };
      testers.runNixOSTest = module: drv { name = "vm-test-run-${module.name}"; };
      # pkgs/build-support/buildenv: a derivation of symlinks to PATHS.
      buildEnv =
        {
          name,
          paths,
          ...
        }:
        drv { inherit name paths; };
      # pkgs/build-support/kernel/compress-firmware.nix (NixOS/nixpkgs 4436175e, all-packages.nix
      # compressFirmwareZstd): runCommand "${firmware.name}-zstd", every file under lib/firmware
      # compressed to <name>.zst.
      compressFirmwareZstd =
        firmware:
        drv {
          name = "${firmware.name}-zstd";
          paths = [ firmware ];
          compressed = "zstd";
        };
      aggregateModules =
        modules:
        drv {
          name = "kernel-modules";
          paths = modules;
        };
      linuxPackages = kernelPackages;
      mkShell =
        attrs:
        drv (
          {
            name = "nix-shell";
          }
          // removeAttrs attrs [
            "inputsFrom"
            "packages"
          ]
        );
      nixfmt = drv { name = "nixfmt-1.0.1"; };
      qemu = drv { name = "qemu-10.0.2"; };
      debootstrap = drv { name = "debootstrap-1.0.141"; };
      jq = drv { name = "jq-1.8.0"; };
      kmod = drv { name = "kmod-34.2"; };
      systemd = drv { name = "systemd-258.1"; };
      bash = drv { name = "bash-5.3"; };
      coreutils = drv { name = "coreutils-9.7"; };
    };

  pkgs = lib.fix (final: foldl' (prev: overlay: prev // overlay final prev) (base final) overlays);
in
pkgs
