# The helper as a Nix package; its unit tests run in the build, its NixOS tests hang off passthru.
{
  lib,
  python3,
  python3Packages,
  callPackage,
  runCommand,
  kmod,
  systemd,
}:

let
  # The unit tests live beside the package, in tests/unit.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ./pyproject.toml
      ./src
      ../tests/unit
    ];
  };
  # The linters also compare the declared dependencies with the imports (tests/dependencies.py),
  # which reads this file and the test bed's guest packages.
  lintSrc = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ./pyproject.toml
      ./package.nix
      ./src
      ../tests/unit
      ../tests/dependencies.py
      ../tests/vm/testbed.py
    ];
  };
  # As nixos-rebuild-ng's passthru.tests.linters (pkgs/by-name/ni/nixos-rebuild-ng/package.nix):
  # the linters and the helper's dependencies, so that strict mypy sees their types.
  python-with-linters = python3.withPackages (
    ps: with ps; [
      mypy
      ruff
      pyudev
      packaging
      zstandard
    ]
  );
in
python3Packages.buildPythonApplication {
  pname = "nvidia-kmod-swap";
  version = "0.1.0";
  pyproject = true;

  inherit src;
  sourceRoot = "source/helper";

  build-system = [ python3Packages.setuptools ];

  # Exactly what the helper imports (docs/design.md: the libraries). systemd-python was renamed
  # from `systemd` in nixpkgs PR #460153 (2025-11), the PyPI name.
  dependencies = with python3Packages; [
    pyudev
    packaging
    systemd-python
    zstandard
  ];

  # kmod: the tests index fake module trees with the real depmod, whose modules.dep.bin the
  # helper reads; pyelftools: the reference for the helper's ELF reader; systemd: the driver
  # links' tests apply the pin with the real systemd-tmpfiles (--root, a fake tree).
  nativeCheckInputs = [
    python3Packages.pytestCheckHook
    python3Packages.pyelftools
    kmod
    systemd
  ];
  enabledTestPaths = [ "../tests/unit" ];
  pythonImportsCheck = [ "nvidia_kmod_swap" ];

  # An attrset of derivations: the NixOS VM tests (`import`ed: see tests/nixos/default.nix) and
  # the linters (settings in pyproject.toml), kept out of the build to keep its closure small.
  passthru.tests = import ../tests/nixos { inherit callPackage; } // {
    linters = runCommand "nvidia-kmod-swap-linters" { nativeBuildInputs = [ python-with-linters ]; } ''
      export RUFF_CACHE_DIR="$(mktemp -d)"
      ruff check --config ${lintSrc}/helper/pyproject.toml ${lintSrc}/helper/src ${lintSrc}/tests/unit
      python3 ${lintSrc}/tests/dependencies.py
      cd ${lintSrc}/helper
      mypy --cache-dir=/dev/null
      touch $out
    '';
  };

  meta = {
    description = "Swap loaded NVIDIA kernel modules for the system profile's driver, live";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "nvidia-kmod-swap";
  };
}
