# A TEST DOUBLE of the NixOS module system (nixpkgs lib/modules.nix), small enough to read:
#
# - modules are functions of { config, options, lib, pkgs, ... } or attrsets, with imports,
#   options and config (or config written at the top, the shorthand);
# - option declarations (mkOption: `_type = "option"`) merge into one tree; defining a path that
#   no module declares is an error ("The option `a.b' does not exist."), as in lib/modules.nix;
# - mkIf and mkOverride are pushed down through attribute sets without evaluating the condition
#   (pushDownProperties), so a module may read `config` in an mkIf around its whole config;
# - at an option, mkIf/mkMerge are discharged, the definitions of the highest priority kept
#   (mkOverride: mkForce 50 < plain 100 < mkDefault 1000 < option default 1500), each checked
#   against the type ("is not of type"), then merged by the type (listOf: in mkOrder order);
#   `apply` runs on the result; an option read with no definition and no default is an error.
# It is lazy where the real one is: config is a fixed point and each option evaluates on demand.
lib:
let
  inherit (builtins)
    all
    attrNames
    concatLists
    concatMap
    filter
    foldl'
    head
    isAttrs
    isFunction
    isList
    isPath
    isString
    listToAttrs
    mapAttrs
    ;

  isOption = v: isAttrs v && v._type or null == "option";

  # One module, normalised to { imports; options; config; }.
  normalise =
    args: m:
    let
      value = if isPath m || isString m then import m else m;
      result = if isFunction value then value args else value;
      structured = result ? options || result ? config;
    in
    {
      imports = result.imports or [ ];
      options = result.options or { };
      config =
        if structured then
          result.config or { }
        else
          removeAttrs result [
            "imports"
            "_file"
            "key"
            "meta"
            "disabledModules"
          ];
    };

  # Every module with its imports; a file imported twice counts once (lib/modules.nix keys a module
  # read from a path by that path).
  collect =
    args: modules:
    let
      all' = concatMap (m: collectOne args m) modules;
      keep =
        acc: m:
        if m.key != null && builtins.elem m.key acc.keys then
          acc
        else
          {
            keys = acc.keys ++ [ m.key ];
            modules = acc.modules ++ [ m ];
          };
    in
    (foldl' keep {
      keys = [ ];
      modules = [ ];
    } all').modules;
  collectOne =
    args: m:
    let
      n = normalise args m // {
        key = if isPath m || isString m then toString m else null;
      };
    in
    [ n ] ++ concatMap (collectOne args) n.imports;

  # Declarations of every module, one tree; the same option declared twice is an error.
  mergeDeclarations =
    loc: decls:
    if builtins.any isOption decls then
      if builtins.length decls == 1 then
        head decls
      else
        throw "The option `${lib.showOption loc}' is declared more than once."
    else
      let
        names = lib.unique (concatMap attrNames decls);
      in
      listToAttrs (
        map (n: {
          name = n;
          value = mergeDeclarations (loc ++ [ n ]) (map (d: d.${n}) (filter (d: d ? ${n}) decls));
        }) names
      );

  # lib/modules.nix pushDownProperties: mkMerge/mkIf/mkOverride around an attrset become the same
  # properties around each of its attributes; the condition is not evaluated here.
  pushDown =
    v:
    if isAttrs v && v._type or null == "merge" then
      concatMap pushDown v.contents
    else if isAttrs v && v._type or null == "if" then
      map (mapAttrs (_: lib.mkIf v.condition)) (pushDown v.content)
    else if isAttrs v && v._type or null == "override" then
      map (mapAttrs (_: lib.mkOverride v.priority)) (pushDown v.content)
    else if isAttrs v && v._type or null == null then
      [ v ]
    else
      throw "a definition of an attribute set is a ${builtins.typeOf v}";

  # lib/modules.nix evalOptionValue: the definitions plus the default (mkOptionDefault, priority
  # 1500) through mergeDefinitions, then `apply`.
  evalOption =
    loc: opt: values:
    let
      defs =
        map (value: {
          file = "<module>";
          inherit value;
        }) values
        ++ lib.optional (opt ? default) {
          file = "<default>";
          value = lib.mkOptionDefault opt.default;
        };
    in
    (opt.apply or (x: x))
      (lib.modules.mergeDefinitions loc (opt.type or lib.types.unspecified) defs).mergedValue;

  # The config tree below a node of declarations, from the definitions made at that node.
  evalNode =
    loc: decl: rawDefs:
    if isOption decl && decl ? renamedTo then
      decl.read
    else if isOption decl then
      evalOption loc decl rawDefs
    else
      let
        defs = concatMap pushDown rawDefs;
        defined = lib.unique (concatMap attrNames defs);
        unknown = filter (n: !(decl ? ${n})) defined;
      in
      if unknown != [ ] then
        throw "The option `${lib.showOption (loc ++ [ (head unknown) ])}' does not exist."
      else
        mapAttrs (n: d: evalNode (loc ++ [ n ]) d (map (x: x.${n}) (filter (x: x ? ${n}) defs))) decl;

  # Every renamed option of a declaration tree: { from; to; }.
  findRenames =
    loc: decl:
    if isOption decl then
      lib.optional (decl ? renamedTo) {
        from = loc;
        to = decl.renamedTo;
      }
    else
      concatMap (n: findRenames (loc ++ [ n ]) decl.${n}) (attrNames decl);

  # The definitions a raw module config makes at PATH, each under the mkIf/mkOverride around it.
  definitionsAt =
    path: value:
    if path == [ ] then
      [ value ]
    else
      concatMap (
        v: if v ? ${head path} then definitionsAt (builtins.tail path) v.${head path} else [ ]
      ) (pushDown value);

  evalModules =
    {
      modules,
      specialArgs ? { },
    }:
    let
      args = {
        inherit lib config options;
        pkgs = specialArgs.pkgs or (throw "pkgs was not given to the module system double");
      }
      // specialArgs;
      collected = collect args modules;
      options = mergeDeclarations [ ] (map (m: m.options) collected);
      # mkRenamedOptionModule: the definitions made at a renamed option's old path are made at its
      # new path too (lib/modules.nix doRename, mkAliasAndWrapDefsWithPriority), conditions kept.
      renames = findRenames [ ] options;
      configs = map (m: m.config) collected;
      moved = map (
        r: lib.setAttrByPath r.to (lib.mkMerge (concatMap (definitionsAt r.from) configs))
      ) renames;
      config = evalNode [ ] options (configs ++ moved);
    in
    {
      inherit config options;
    };
in
{
  inherit evalModules;
}
