# Evaluates nixos/module.nix with lib-double.nix: option defaults, the user's settings (type-checked),
# and the module's config with mkIf/mkMerge/mkBefore resolved. Returns { config; options; }.
{
  settings ? { }, # services.nvidiaKmodSwap values
  hardware ? { }, # hardware.nvidia values the module reads
  modDirVersion ? "6.12.8-zen1",
}:
let
  lib = import ./lib-double.nix;
  inherit (builtins) attrNames foldl' isAttrs isList mapAttrs throw;

  # Stand-ins for the two pkgs functions the module calls.
  pkgs = {
    callPackage = _path: _args: { outPath = "/nix/store/hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh-nvidia-kmod-swap-0.1.0"; };
    writeText = name: text: {
      inherit name text;
      outPath = "/nix/store/tttttttttttttttttttttttttttttttt-${name}";
    };
  };

  module = import ../../nixos/module.nix;
  evalWith = config: module { inherit config lib pkgs; };

  # Lazily tied to the final config: option defaults may read it (nvidiaPackage reads hardware.nvidia).
  optionDecls = (evalWith config).options.services.nvidiaKmodSwap;
  unknown = builtins.filter (name: !(optionDecls ? ${name})) (attrNames settings);
  checked =
    if unknown != [ ] then
      throw "services.nvidiaKmodSwap.${builtins.head unknown}: no such option"
    else
      mapAttrs (
    name: value:
    if optionDecls.${name}.type.check value then
      value
    else
      throw "services.nvidiaKmodSwap.${name}: not a ${optionDecls.${name}.type.name}"
  ) settings;

  config = {
    services.nvidiaKmodSwap = mapAttrs (_: o: o.default or null) optionDecls // checked;
    hardware.nvidia = hardware;
    boot.kernelPackages.kernel = {
      inherit modDirVersion;
      version = "6.12.8";
    };
  };

  isPackage = v: isAttrs v && v ? outPath;
  merge =
    a: b:
    if isAttrs a && isAttrs b && !(isPackage a) && !(isPackage b) then
      a // mapAttrs (n: v: if a ? ${n} then merge a.${n} v else v) b
    else if isList a && isList b then
      a ++ b
    else
      b;
  resolve =
    v:
    if isAttrs v && v ? _type then
      if v._type == "if" then
        (if v.condition then resolve v.content else { })
      else if v._type == "merge" then
        foldl' merge { } (map resolve v.contents)
      else if v._type == "order" then
        resolve v.content
      else
        v
    else if isAttrs v && !(isPackage v) then
      mapAttrs (_: resolve) v
    else
      v;
in
{
  config = resolve (evalWith config).config;
  options = attrNames optionDecls;
}
