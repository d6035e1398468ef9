{
  description = "Live NVIDIA driver updates on NixOS: swap the loaded kernel modules";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems =
        f:
        lib.genAttrs systems (
          system:
          f (
            import nixpkgs {
              inherit system;
              overlays = [ self.overlays.default ];
            }
          )
        );
    in
    {
      overlays.default = final: _prev: {
        nvidia-kmod-swap = final.callPackage ./helper/package.nix { };
      };

      nixosModules.nvidia-kmod-swap = ./nixos/module.nix;
      nixosModules.default = self.nixosModules.nvidia-kmod-swap;

      packages = forAllSystems (pkgs: {
        inherit (pkgs) nvidia-kmod-swap;
        default = pkgs.nvidia-kmod-swap;
      });

      # The package (with its unit tests), an evaluation of the module against the real NixOS
      # modules, and the NixOS VM tests (passthru.tests: a plain attrset of derivations, as
      # `nix flake check` wants every checks.<system>.<name> to be).
      checks = forAllSystems (
        pkgs:
        {
          package = pkgs.nvidia-kmod-swap;
          module-eval = pkgs.callPackage ./tests/nixos/module-eval.nix { inherit nixpkgs; };
        }
        // pkgs.nvidia-kmod-swap.passthru.tests
      );

      formatter = forAllSystems (pkgs: pkgs.nixfmt);

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ pkgs.nvidia-kmod-swap ];
          packages = [
            pkgs.nixfmt
            pkgs.qemu
            pkgs.debootstrap
          ];
        };
      });
    };
}
