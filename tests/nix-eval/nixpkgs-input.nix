# The `nixpkgs` flake input, doubled: what flake.nix and tests/nixos/module-eval.nix use of it.
# `import nixpkgs { ... }` reads outPath (nixpkgs-double/); `lib` is lib-double.nix plus
# nixosSystem (nixpkgs' flake.nix: lib.nixosSystem evaluates nixos/lib/eval-config.nix, the NixOS
# modules plus the given ones), here modules-double.nix over nixos-double.nix.
{
  era ? "2026",
  # A real nixpkgs lib instead of the double (tests/nix-eval/run --real-lib DIR).
  lib ? import ./lib-double.nix,
}:
{
  outPath = ./nixpkgs-double;
  lib = lib // {
    nixosSystem =
      {
        modules,
        system ? null,
        specialArgs ? { },
        # Not nixosSystem's: the double's boot.kernel.* rename (nixos-double.nix).
        renamed ? false,
      }:
      let
        eval = lib.evalModules {
          modules = import ./nixos-double.nix { inherit era renamed; } ++ modules;
          specialArgs = {
            pkgs = import ./nixpkgs-double {
              system = if system != null then system else eval.config.nixpkgs.hostPlatform;
              inherit lib;
            };
          }
          // specialArgs;
        };
      in
      eval;
  };
}
