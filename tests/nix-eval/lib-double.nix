# A TEST DOUBLE of the nixpkgs `lib` functions our Nix files use, for machines without nixpkgs
# (plain `nix-instantiate`). Each definition follows the nixpkgs file named beside it (read in
# NixOS/nixpkgs and in nix-community/nixpkgs.lib, 2025-2026 versions); the module system itself is
# modules-double.nix. Where the real function does more, only the part we use is here, and it
# behaves as the real one does for it (an unknown option is an error, a bad type is an error, ...).
let
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    concatStringsSep
    elem
    filter
    foldl'
    functionArgs
    genList
    head
    intersectAttrs
    isAttrs
    isBool
    isFunction
    isInt
    isList
    isPath
    isString
    length
    listToAttrs
    mapAttrs
    match
    replaceStrings
    stringLength
    substring
    tail
    ;

  # lib/types.nix: a type is { name; description; check; merge; }; merge gets the option's location
  # (a list of names) and its definitions ({ file; value; }) after lib/modules.nix mergeDefinitions
  # discharged mkIf/mkMerge, kept the highest mkOverride priority and sorted by mkOrder.
  mkOptionType =
    {
      name,
      check ? (_: true),
      merge ? mergeDefaultOption,
      description ? name,
      nestedTypes ? { },
    }:
    {
      _type = "option-type";
      inherit
        name
        check
        merge
        description
        nestedTypes
        ;
    };

  showOption = concatStringsSep ".";

  # lib/options.nix mergeEqualOption: one value, or several equal ones; else "conflicting definition
  # values".
  mergeEqualOption =
    loc: defs:
    if defs == [ ] then
      abort "This case should never happen."
    else if length defs == 1 then
      (head defs).value
    else if all (d: d.value == (head defs).value) defs then
      (head defs).value
    else
      throw "The option `${showOption loc}' has conflicting definition values.";
  # lib/options.nix mergeOneOption: exactly one definition.
  mergeOneOption =
    loc: defs:
    if length defs == 1 then
      (head defs).value
    else
      throw "The option `${showOption loc}' is defined multiple times, expected once.";
  # lib/options.nix mergeDefaultOption (types without a merge of their own, e.g. unspecified).
  mergeDefaultOption =
    loc: defs:
    let
      list = map (d: d.value) defs;
    in
    if length list == 1 then
      head list
    else if all isList list then
      concatLists list
    else if all isAttrs list then
      foldl' (a: b: a // b) { } list
    else if all isBool list then
      any (x: x) list
    else if all isString list then
      concatStringsSep "" list
    else if all isInt list && all (x: x == head list) list then
      head list
    else
      throw "Cannot merge definitions of `${showOption loc}'.";

  isDerivation = v: isAttrs v && v.type or null == "derivation";
  isStringLike = v: isString v || isPath v || (isAttrs v && (v ? outPath || v ? __toString));

  # lib/modules.nix dischargeProperties: mkMerge flattened, mkIf evaluated (false: nothing).
  discharge =
    v:
    if isAttrs v && v._type or null == "merge" then
      concatLists (map discharge v.contents)
    else if isAttrs v && v._type or null == "if" then
      if v.condition then discharge v.content else [ ]
    else
      [ v ];

  # lib/modules.nix filterOverrides' and sortProperties (mkOverride, mkOrder).
  defaultOverridePriority = 100;
  defaultOrderPriority = 1000;
  typeOf = v: if isAttrs v then v._type or null else null;
  filterOverrides =
    defs:
    let
      prio = d: if typeOf d.value == "override" then d.value.priority else defaultOverridePriority;
      best = foldl' (acc: d: if prio d < acc then prio d else acc) 9999 defs;
      strip = v: if typeOf v == "override" then strip v.content else v;
    in
    map (d: d // { value = strip d.value; }) (filter (d: prio d == best) defs);
  sortProperties =
    defs:
    let
      strip = d: if typeOf d.value == "order" then d // { value = d.value.content; } else d;
      prio = d: if typeOf d.value == "order" then d.value.priority else defaultOrderPriority;
    in
    map strip (builtins.sort (a: b: prio a < prio b) defs);

  # lib/modules.nix mergeDefinitions: { defsFinal; isDefined; mergedValue; optionalValue; }.
  mergeDefinitions = loc: type: defs: rec {
    defsFinal = sortProperties (
      filterOverrides (concatLists (map (d: map (v: d // { value = v; }) (discharge d.value)) defs))
    );
    isDefined = defsFinal != [ ];
    mergedValue =
      if !isDefined then
        throw "The option `${showOption loc}' was accessed but has no value defined."
      else if all (d: type.check d.value) defsFinal then
        type.merge loc defsFinal
      else
        throw "A definition for option `${showOption loc}' is not of type `${type.description}'.";
    optionalValue = if isDefined then { value = mergedValue; } else { };
  };

  types = rec {
    bool = mkOptionType {
      name = "bool";
      check = isBool;
      merge = mergeEqualOption;
    };
    str = mkOptionType {
      name = "str";
      check = isString;
      merge = mergeEqualOption;
    };
    # lib/types.nix `lines`: strings joined with newlines.
    lines = mkOptionType {
      name = "lines";
      check = isString;
      merge = _loc: defs: concatStringsSep "\n" (map (d: d.value) defs);
    };
    path = mkOptionType {
      name = "path";
      check = isStringLike;
      merge = mergeEqualOption;
    };
    package = mkOptionType {
      name = "package";
      check = v: isDerivation v || isStringLike v;
      merge = mergeOneOption;
    };
    int = mkOptionType {
      name = "int";
      check = isInt;
      merge = mergeEqualOption;
    };
    ints.positive = mkOptionType {
      name = "positiveInt";
      description = "positive integer, meaning >0";
      check = v: isInt v && v > 0;
      merge = mergeEqualOption;
    };
    # lib/types.nix ints.unsigned = addCheck lib.types.int (x: x >= 0) // { name = "unsignedInt"; }
    ints.unsigned = mkOptionType {
      name = "unsignedInt";
      description = "unsigned integer, meaning >=0";
      check = v: isInt v && v >= 0;
      merge = mergeEqualOption;
    };
    # lib/types.nix strMatching (nix-community/nixpkgs.lib de42d442): a string builtins.match
    # accepts; str's merge.
    strMatching =
      pattern:
      mkOptionType {
        name = "strMatching ${builtins.toJSON pattern}";
        description = "string matching the pattern ${pattern}";
        check = v: isString v && builtins.match pattern v != null;
        merge = mergeEqualOption;
      };
    # lib/types.nix either (same commit): t1's merge when every definition is a t1, else t2's when
    # every one is a t2, else a conflict.
    either =
      t1: t2:
      mkOptionType {
        name = "either";
        description = "${t1.description or t1.name} or ${t2.description or t2.name}";
        check = v: t1.check v || t2.check v;
        merge =
          loc: defs:
          if all (d: t1.check d.value) defs then
            t1.merge loc defs
          else if all (d: t2.check d.value) defs then
            t2.merge loc defs
          else
            throw "The option `${showOption loc}' has conflicting definition values.";
      };
    enum =
      values:
      mkOptionType {
        name = "enum";
        description = "one of ${concatStringsSep ", " (map builtins.toJSON values)}";
        check = v: elem v values;
        merge = mergeEqualOption;
      };
    # lib/types.nix listOf: the (already mkOrder-sorted) definitions concatenated, elements checked.
    listOf =
      t:
      mkOptionType {
        name = "listOf";
        description = "list of ${t.description}";
        check = isList;
        merge =
          loc: defs:
          let
            elems = concatLists (map (d: d.value) defs);
          in
          if all t.check elems then
            elems
          else
            throw "A definition for option `${showOption loc}' is not of type `${t.description}'.";
        nestedTypes.elemType = t;
      };
    # lib/types.nix nullOr: null if every definition is null, an error if only some are.
    nullOr =
      t:
      mkOptionType {
        name = "nullOr";
        description = "null or ${t.description}";
        check = v: v == null || t.check v;
        merge =
          loc: defs:
          if all (d: d.value == null) defs then
            null
          else if any (d: d.value == null) defs then
            throw "The option `${showOption loc}' is defined both null and not null."
          else
            t.merge loc defs;
        nestedTypes.elemType = t;
      };
    # lib/types.nix attrsOf: each name merged by mergeDefinitions with the element type; a name
    # whose definitions all vanish (mkIf false) is not there at all (optionalValue).
    attrsOf =
      t:
      mkOptionType {
        name = "attrsOf";
        description = "attribute set of ${t.description}";
        check = isAttrs;
        merge =
          loc: defs:
          let
            names = unique (concatLists (map (d: attrNames d.value) defs));
            merged = map (n: {
              name = n;
              m = mergeDefinitions (loc ++ [ n ]) t (
                map (d: d // { value = d.value.${n}; }) (filter (d: d.value ? ${n}) defs)
              );
            }) names;
          in
          listToAttrs (
            map (x: {
              inherit (x) name;
              value = x.m.optionalValue.value;
            }) (filter (x: x.m.optionalValue ? value) merged)
          );
        nestedTypes.elemType = t;
      };
    # lib/types.nix anything: sets merge recursively (attrsOf anything), a string-like set (a
    # package) takes one definition, everything else must be equal.
    anything = mkOptionType {
      name = "anything";
      merge =
        loc: defs:
        let
          kind = v: if isAttrs v && isStringLike v then "stringCoercibleSet" else builtins.typeOf v;
          common = kind (head defs).value;
        in
        if !all (d: kind d.value == common) defs then
          throw "The option `${showOption loc}' has conflicting option types."
        else if common == "set" then
          (attrsOf anything).merge loc defs
        else if common == "stringCoercibleSet" then
          mergeOneOption loc defs
        else
          mergeEqualOption loc defs;
    };
    unspecified = mkOptionType { name = "unspecified"; };
    raw = mkOptionType {
      name = "raw";
      merge = mergeOneOption;
    };
    # lib/types.nix coercedTo: values of `from` are converted, then merged as `to`.
    coercedTo =
      from: coerce: to:
      mkOptionType {
        name = "coercedTo";
        description = "${to.description} or ${from.description} convertible to it";
        check = v: to.check v || from.check v;
        merge =
          loc: defs:
          to.merge loc (
            map (
              d:
              d
              // {
                value = if to.check d.value then d.value else coerce d.value;
              }
            ) defs
          );
      };
  };

  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];

  # lib/attrsets.nix attrByPath: the value at a path of names, or DEFAULT where a name is missing.
  attrByPath =
    attrPath: default: set:
    let
      go =
        n: s:
        if n == builtins.length attrPath then
          s
        else
          let
            attr = builtins.elemAt attrPath n;
          in
          if s ? ${attr} then go (n + 1) s.${attr} else default;
    in
    go 0 set;

  # lib/customisation.nix makeOverridable: an attrset result gets `override` and
  # `overrideDerivation` (any attrset, derivation or not: `if isAttrs result`); a function result
  # gets `override` as a functor; anything else is returned as it is.
  makeOverridable =
    f: args:
    let
      result = f args;
      overrideArgs =
        newArgs: makeOverridable f (args // (if isFunction newArgs then newArgs args else newArgs));
    in
    if isAttrs result then
      result
      // {
        override = overrideArgs;
        overrideDerivation = fdrv: result // fdrv result;
      }
    else if isFunction result then
      {
        __functor = _self: result;
        override = overrideArgs;
      }
    else
      result;

  # lib/customisation.nix callPackageWith: a path is imported; its formal arguments are filled from
  # autoArgs, overridden by args; the result goes through makeOverridable. A missing argument
  # aborts.
  callPackageWith =
    autoArgs: fn: args:
    let
      f = if isFunction fn then fn else import fn;
      fargs = functionArgs f;
      allArgs = intersectAttrs fargs autoArgs // args;
      missing = filter (n: !fargs.${n} && !(allArgs ? ${n})) (attrNames fargs);
    in
    if missing == [ ] then
      makeOverridable f allArgs
    else
      abort "lib.customisation.callPackageWith: Function called without argument ${head missing}";

  # lib/strings.nix versions: splitVersion on "." and "-", compared part by part (builtins).
  versionOlder = v1: v2: builtins.compareVersions v2 v1 == 1;
  versionAtLeast = v1: v2: !versionOlder v1 v2;

  hasPrefix = pref: str: substring 0 (stringLength pref) str == pref;
  hasSuffix =
    suffix: content:
    let
      l = stringLength content;
      s = stringLength suffix;
    in
    s <= l && substring (l - s) s content == suffix;

  lib = rec {
    inherit
      types
      mkOptionType
      mergeEqualOption
      isDerivation
      makeOverridable
      callPackageWith
      versionOlder
      versionAtLeast
      hasPrefix
      hasSuffix
      unique
      attrByPath
      discharge
      mergeOneOption
      mergeDefaultOption
      showOption
      ;
    modules = {
      inherit mergeDefinitions;
    };
    toList = x: if isList x then x else [ x ];
    inherit (builtins)
      all
      any
      attrNames
      attrValues
      concatLists
      concatStringsSep
      elem
      filter
      foldl'
      head
      isAttrs
      isFunction
      isList
      isString
      length
      listToAttrs
      mapAttrs
      replaceStrings
      tail
      toJSON
      ;

    # lib/options.nix mkOption: the attrset, tagged; mkEnableOption: a bool defaulting to false.
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption =
      name:
      mkOption {
        default = false;
        example = true;
        description = "Whether to enable ${name}.";
        type = types.bool;
      };
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };
    literalMD = text: {
      _type = "literalMD";
      inherit text;
    };
    mdDoc = x: x;

    # lib/modules.nix: properties are tagged values the module system resolves.
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkMerge = contents: {
      _type = "merge";
      inherit contents;
    };
    mkOverride = priority: content: {
      _type = "override";
      inherit priority content;
    };
    mkOptionDefault = mkOverride 1500;
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    mkOrder = priority: content: {
      _type = "order";
      inherit priority content;
    };
    mkBefore = mkOrder 500;
    mkAfter = mkOrder 1500;

    # lib/lists.nix, lib/attrsets.nix, lib/strings.nix, lib/trivial.nix
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalAttrs = cond: as: if cond then as else { };
    optionalString = cond: s: if cond then s else "";
    genAttrs =
      names: f:
      listToAttrs (
        map (n: {
          name = n;
          value = f n;
        }) names
      );
    mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (attrNames attrs);
    # lib/strings.nix: concatStrings = builtins.concatStringsSep "".
    concatStrings = concatStringsSep "";
    concatMapStringsSep =
      sep: f: list:
      concatStringsSep sep (map f list);
    filterAttrs =
      pred: set:
      listToAttrs (
        map (n: {
          name = n;
          value = set.${n};
        }) (filter (n: pred n set.${n}) (attrNames set))
      );
    getOutput =
      output: pkg:
      if !pkg ? outputSpecified || !pkg.outputSpecified then pkg.${output} or pkg.out or pkg else pkg;
    getBin = getOutput "bin";
    # lib/meta.nix getExe/getExe': the program in the bin output of a *derivation* (asserted);
    # getExe takes meta.mainProgram (the real one warns and guesses the name without it).
    getExe' =
      x: y:
      assert assertMsg (isDerivation x)
        "lib.meta.getExe': The first argument is of type ${builtins.typeOf x}, not a derivation.";
      "${getBin x}/bin/${y}";
    getExe = x: getExe' x (x.meta.mainProgram or x.pname or x.name);
    toLower = replaceStrings (genList (i: substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ") 26) (
      genList (i: substring i 1 "abcdefghijklmnopqrstuvwxyz") 26
    );
    # lib/strings.nix trim: white space off both ends.
    trim =
      s:
      let
        m = match "[[:space:]]*(.*[^[:space:]])[[:space:]]*" s;
      in
      if m == null then "" else head m;
    escapeShellArg = arg: "'${replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
    escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);
    # lib/asserts.nix assertMsg: throws the message when false.
    assertMsg = pred: msg: pred || throw msg;
    id = x: x;
    # lib/fixed-points.nix fix
    fix =
      f:
      let
        x = f x;
      in
      x;
    trivial.release = "26.05";
    mapNullable = f: a: if a == null then a else f a;
    last = xs: builtins.elemAt xs (length xs - 1);
    intersectLists = e: filter (x: elem x e);
    subtractLists = e: filter (x: !(elem x e));

    # lib/lists.nix
    imap1 = f: list: genList (n: f (n + 1) (builtins.elemAt list n)) (length list);
    # lib/fileset: toSource names its store path "source" (cleanSourceWith { name = "source"; });
    # unions refuses an element that is not an existing path (internal.nix _coerce: "Element N
    # (...) is a path that does not exist."), toSource a file set reaching outside `root`
    # (default.nix: "... which is not under the `root` ...").
    fileset = {
      unions = lib.imap1 (
        i: x:
        if !builtins.isPath x then
          throw "lib.fileset.unions: Element ${toString i} is of type ${builtins.typeOf x}, but it should be a file set or a path instead."
        else if !builtins.pathExists x then
          throw "lib.fileset.unions: Element ${toString i} (${toString x}) is a path that does not exist."
        else
          x
      );
      toSource =
        { root, fileset }:
        let
          under = x: lib.hasPrefix "${toString root}/" "${toString x}/";
          outside = filter (x: !under x) fileset;
        in
        if outside != [ ] then
          throw "lib.fileset.toSource: `fileset` could contain files in ${toString (head outside)}, which is not under the `root` (${toString root})."
        else
          {
            name = "source";
            outPath = "/nix/store/ssssssssssssssssssssssssssssssss-source";
            inherit root fileset;
          };
    };
    licenses.mit = {
      shortName = "mit";
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];
    # lib/attrsets.nix
    setAttrByPath =
      attrPath: value:
      if attrPath == [ ] then value else { ${head attrPath} = setAttrByPath (tail attrPath) value; };
    getAttrFromPath =
      attrPath: set:
      attrByPath attrPath (throw "cannot find attribute `${concatStringsSep "." attrPath}'") set;
    # lib/modules.nix mkRenamedOptionModule (doRename { warn = true; use = builtins.trace
    # "Obsolete option `FROM' is used. It was renamed to `TO'."; }): FROM becomes an alias whose
    # definitions are TO's (modules-double.nix moves them) and whose every read prints that trace
    # and returns TO's value. (The real one also warns when FROM is defined, through `warnings`,
    # which the NixOS double does not declare.)
    mkRenamedOptionModule =
      from: to:
      { config, ... }:
      {
        options = setAttrByPath from (mkOption {
          renamedTo = to;
          read = builtins.trace "Obsolete option `${showOption from}' is used. It was renamed to `${showOption to}'." (
            getAttrFromPath to config
          );
        });
      };
    evalModules = (import ./modules-double.nix lib).evalModules;
  };
in
lib
