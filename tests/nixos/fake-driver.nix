# The test bed's fake NVIDIA driver (tests/fake-driver) built for the test machine's kernel and
# shaped like nixpkgs' nvidia_x11 as far as NixOS and services.nvidiaKmodSwap look at it:
#
# - 2026 layout (pkgs/os-specific/linux/nvidia-x11/generic.nix, binaries.nix, kernel-modules.nix):
#   outputs out, bin (bin/nvidia-smi), firmware (lib/firmware/nvidia/<version>); the kernel
#   modules are separate derivations, passthru.mod (proprietary) and passthru.open, each with
#   lib/modules/<modDirVersion>/kernel/drivers/video/*.ko (NVIDIA's kernel-open/Makefile:
#   INSTALL_MOD_DIR ?= kernel/drivers/video); passthru.persistenced has bin/nvidia-persistenced
#   (persistenced.nix, meta.mainProgram).
# - "legacy" layout (builder.sh before 2026): the proprietary modules live in the bin output,
#   bin/lib/modules/<modDirVersion>/misc/*.ko, and there is no passthru.mod.
#
# Built as nixpkgs builds out-of-tree modules: kernelModuleMakeFlags from the kernelPackages scope
# (pkgs/top-level/linux-kernels.nix) and kernel.moduleBuildDependencies; kernel.makeFlags carries
# O=$(buildRoot) and breaks such builds on Linux >= 6.13 (nixpkgs issue 375605).
{
  lib,
  stdenv,
  kernel,
  kernelModuleMakeFlags,
  version,
  # "2026" (modules in passthru.mod/.open) or "legacy" (proprietary modules in the bin output).
  layout ? "2026",
  # A kernel module whose init fails on purpose (e.g. "NVIDIA_UVM"), for the rollback story.
  failInit ? null,
}:

let
  suffix = lib.optionalString (failInit != null) "-${lib.toLower failInit}-fails";

  modules =
    flavour: installDir:
    stdenv.mkDerivation {
      pname = "fake-nvidia-${flavour}${suffix}";
      version = "${kernel.version}-${version}";
      src = ../fake-driver;
      nativeBuildInputs = kernel.moduleBuildDependencies;
      buildPhase = ''
        runHook preBuild
        make -j$NIX_BUILD_CORES -C ${kernel.dev}/lib/modules/${kernel.modDirVersion}/build M=$PWD \
          ${lib.escapeShellArgs kernelModuleMakeFlags} FAKE_NV_VERSION=${version} \
          ${lib.optionalString (failInit != null) "FAKE_NV_FAIL=${failInit}"} modules
        runHook postBuild
      '';
      installPhase = ''
        runHook preInstall
        install -Dm444 -t $out/lib/modules/${kernel.modDirVersion}/${installDir} nvidia*.ko
        runHook postInstall
      '';
    };

  mod = modules "kernel-modules" "kernel/drivers/video";
  open = modules "open" "kernel/drivers/video";
  legacyModules = modules "legacy-kernel-modules" "misc";

  # A GPU program as nixpkgs builds them: addDriverRunpath's RUNPATH /run/opengl-driver/lib and
  # nothing else (pkgs/build-support/add-driver-runpath: driverLink), linked against any build
  # of libnvidia-ml.so.1.
  client = stdenv.mkDerivation {
    pname = "fake-gpu-client";
    inherit version;
    src = ../fake-driver;
    buildPhase = ''
      runHook preBuild
      $CC -O2 -Wall -shared -fPIC -I. -DFAKE_NV_VERSION='"${version}"' \
        -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 libnvidia-ml.c
      $CC -O2 -Wall -o gpu-client gpu-client.c -L. -l:libnvidia-ml.so.1 \
        -Wl,--enable-new-dtags,-rpath,/run/opengl-driver/lib
      runHook postBuild
    '';
    installPhase = ''
      runHook preInstall
      install -Dm755 -t $out/bin gpu-client
      runHook postInstall
    '';
    dontPatchELF = true; # the RUNPATH is the point
    meta.mainProgram = "gpu-client";
  };

  persistenced = stdenv.mkDerivation {
    pname = "fake-nvidia-persistenced";
    inherit version;
    src = ../fake-driver;
    buildPhase = ''
      runHook preBuild
      $CC -O2 -Wall -I. -DFAKE_NV_VERSION='"${version}"' -o nvidia-persistenced \
        nvidia-persistenced.c
      runHook postBuild
    '';
    installPhase = ''
      runHook preInstall
      install -Dm755 -t $out/bin nvidia-persistenced
      runHook postInstall
    '';
    meta.mainProgram = "nvidia-persistenced";
  };
in
stdenv.mkDerivation {
  pname = "fake-nvidia-x11" + suffix;
  inherit version;
  src = ../fake-driver;
  outputs = [
    "out"
    "bin"
    "firmware"
  ];

  # builder.sh (NixOS/nixpkgs 01f31c2e): every library in $out/lib as lib<name>.so.<version>,
  # linked from .so.1 (ln -srnf); nvidia-smi in $bin/bin with a RUNPATH of $out/lib. The test
  # machine's GPU program (gpu-client) is in passthru.client.
  buildPhase = ''
    runHook preBuild
    $CC -O2 -Wall -I. -DFAKE_NV_VERSION='"${version}"' -o nvidia-smi nvidia-smi.c
    $CC -O2 -Wall -shared -fPIC -I. -DFAKE_NV_VERSION='"${version}"' \
      -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.${version} libnvidia-ml.c
    runHook postBuild
  '';

  installPhase = ''
    runHook preInstall
    install -Dm755 -t $bin/bin nvidia-smi
    install -Dm755 -t $out/lib libnvidia-ml.so.${version}
    ln -srnf $out/lib/libnvidia-ml.so.${version} $out/lib/libnvidia-ml.so.1
    mkdir -p $out/lib $firmware/lib/firmware/nvidia/${version}
    echo "fake GSP firmware ${version}" > $firmware/lib/firmware/nvidia/${version}/gsp_ga10x.bin
  ''
  + lib.optionalString (layout == "legacy") ''
    modules=lib/modules/${kernel.modDirVersion}/misc
    install -Dm444 -t $bin/$modules ${legacyModules}/$modules/*.ko
  ''
  + ''
    runHook postInstall
  '';

  # generic.nix (NixOS/nixpkgs 37f8b96b): derivation attributes nvidia.nix reads on any output
  # (useProfiles: the environment.etc mkIf of its X11 branch, forced by every read of
  # environment.etc).
  useGLVND = true;
  useProfiles = false;

  passthru = {
    inherit open persistenced client;
    # udev.nix compresses hardware.firmware with zstd on kernels >= 5.19 unless a package says
    # this (generic.nix passthru; stdenv puts passthru on every output, `firmware` included): the
    # driver loads nvidia/<version>/gsp_*.bin by that name.
    compressFirmware = false;
    ibtSupport = true;
  }
  // lib.optionalAttrs (layout == "2026") { inherit mod; };
}
