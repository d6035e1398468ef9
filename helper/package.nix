# The helper as a Nix package; its unit tests run in the build, its NixOS tests hang off passthru.
{
  lib,
  python3Packages,
  callPackage,
  kmod,
}:

python3Packages.buildPythonApplication {
  pname = "nvidia-kmod-swap";
  version = "0.1.0";
  pyproject = true;

  # The unit tests live beside the package, in tests/unit.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ./pyproject.toml
      ./src
      ../tests/unit
    ];
  };
  sourceRoot = "source/helper";

  build-system = [ python3Packages.setuptools ];

  dependencies = with python3Packages; [
    pyudev
    packaging
    zstandard
  ];

  # kmod: the tests index fake module trees with the real depmod, whose modules.dep.bin the
  # helper reads.
  nativeCheckInputs = [
    python3Packages.pytestCheckHook
    kmod
  ];
  enabledTestPaths = [ "../tests/unit" ];
  pythonImportsCheck = [ "nvidia_kmod_swap" ];

  # An attrset of NixOS VM tests (derivations), `import`ed: see tests/nixos/default.nix.
  passthru.tests = import ../tests/nixos { inherit callPackage; };

  meta = {
    description = "Swap loaded NVIDIA kernel modules for the system profile's driver, live";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "nvidia-kmod-swap";
  };
}
