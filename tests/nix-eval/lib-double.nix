# A TEST DOUBLE of the few nixpkgs `lib` functions nixos/module.nix uses, so that the module's
# option and config logic can be evaluated on machines without nixpkgs (plain `nix-instantiate`).
# It is not the module system: options are records with a type predicate, mkIf/mkMerge/mkBefore
# are tagged values that eval-module.nix resolves. The real thing runs in the flake's checks.
let
  inherit (builtins) all elem isAttrs isBool isInt isList isString;
  type = name: check: { inherit name check; };
in
rec {
  mkOption = attrs: attrs // { _option = true; };
  mkEnableOption = description: mkOption {
    type = types.bool;
    default = false;
    inherit description;
  };
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  types = {
    bool = type "bool" isBool;
    str = type "str" isString;
    package = type "package" (v: isAttrs v && v ? outPath);
    enum = values: type "enum" (v: elem v values);
    listOf = t: type "listOf ${t.name}" (v: isList v && all t.check v);
    ints.positive = type "positive int" (v: isInt v && v > 0);
  };

  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkBefore = content: { _type = "order"; priority = 500; inherit content; };
  mkForce = content: content;

  optional = cond: x: if cond then [ x ] else [ ];
}
