# One NixOS VM test: machine.nix with a driver layout, and a story script run after common.py.
{
  testers,
  name,
  script,
  layout ? "2026",
  open ? false,
  # More NixOS configuration for the machine (a story's own services).
  extra ? { },
}:

testers.runNixOSTest {
  name = "nvidia-kmod-swap-${name}";
  nodes.machine = {
    imports = [
      (import ./machine.nix { inherit layout open; })
      extra
    ];
  };
  testScript =
    let
      versions = import ./versions.nix;
    in
    ''
      OLD, NEW = "${versions.old}", "${versions.new}"
    ''
    + builtins.readFile ./common.py
    + builtins.readFile script;
}
