# The test bed's fake NVIDIA driver (tests/fake-driver) built for a NixOS kernel and shaped like
# nvidia_x11 as far as services.nvidiaKmodSwap looks at it: `version`, a `bin` output with
# lib/modules/<modDirVersion>/misc/*.ko and bin/{nvidia-smi,nvidia-persistenced}, and `open`.
{
  lib,
  stdenv,
  kernel,
  version,
  # A kernel module whose init fails on purpose (e.g. "NVIDIA_UVM"), for the rollback test.
  failInit ? null,
}:

stdenv.mkDerivation {
  pname = "fake-nvidia-x11" + lib.optionalString (failInit != null) "-${lib.toLower failInit}-fails";
  inherit version;
  src = ../fake-driver;
  outputs = [
    "out"
    "bin"
  ];
  nativeBuildInputs = kernel.moduleBuildDependencies;

  buildPhase = ''
    runHook preBuild
    make -C ${kernel.dev}/lib/modules/${kernel.modDirVersion}/build M=$PWD \
      ${lib.escapeShellArgs kernel.makeFlags} FAKE_NV_VERSION=${version} \
      ${lib.optionalString (failInit != null) "FAKE_NV_FAIL=${failInit}"} modules
    for tool in nvidia-persistenced nvidia-smi; do
      $CC -O2 -Wall -I. -DFAKE_NV_VERSION='"${version}"' -o $tool $tool.c
    done
    runHook postBuild
  '';

  installPhase = ''
    runHook preInstall
    install -Dm444 -t $bin/lib/modules/${kernel.modDirVersion}/misc nvidia*.ko
    install -Dm755 -t $bin/bin nvidia-persistenced nvidia-smi
    mkdir -p $out
    runHook postInstall
  '';

  passthru.open = null;
}
