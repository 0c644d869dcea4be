//! Within each crate the modules depend one way, as the crates do (Cargo refuses a cycle of
//! crates; nothing refuses one of modules): no module reaches, by a `crate::`, `super::` or
//! `self::` path, a module that reaches back. A module may use its ancestors (Rust lets it
//! see their private items for that), and test modules (`#[cfg(test)]`) are not counted.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use proc_macro2::{TokenStream, TokenTree};
use syn::{Attribute, Item, UseTree, visit::Visit};

/// Every crate's source folder, from the workspace root.
const CRATES: [&str; 8] = [
    "common/src",
    "ebpf/src",
    "userspace/policy/src",
    "userspace/dataplane/src",
    "userspace/src",
    "userspace/pktgen/src",
    "userspace/bench/src",
    "xtask/src",
];

/// A module's path in its crate (`["bgp", "announce"]`; the root is empty).
type Module = Vec<String>;

/// Each module's source files (a crate's library and program share the root).
fn modules(src: &Path) -> BTreeMap<Module, Vec<PathBuf>> {
    let mut out: BTreeMap<Module, Vec<PathBuf>> = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module =
                rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            if matches!(module.last().map(String::as_str), Some("lib" | "main" | "mod")) {
                module.pop();
            }
            out.entry(module).or_default().push(path);
        }
    }
    out
}

fn cfg_test(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta.require_list().is_ok_and(|l| l.tokens.to_string() == "test")
    })
}

/// The paths a file names, each as written (`crate::flows::addr`, `super::announce`).
#[derive(Default)]
struct Paths(Vec<Vec<String>>);

impl Paths {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &UseTree) {
        match tree {
            UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            UseTree::Name(n) if n.ident == "self" => self.0.push(prefix.clone()),
            UseTree::Name(n) => self.0.push([&prefix[..], &[n.ident.to_string()]].concat()),
            UseTree::Rename(r) => self.0.push([&prefix[..], &[r.ident.to_string()]].concat()),
            UseTree::Glob(_) => self.0.push(prefix.clone()),
            UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(prefix, t)),
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item(&mut self, item: &'ast Item) {
        let attrs = match item {
            Item::Mod(i) => &i.attrs,
            Item::Fn(i) => &i.attrs,
            Item::Impl(i) => &i.attrs,
            Item::Use(i) => &i.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if cfg_test(attrs) {
            return;
        }
        match item {
            Item::Use(u) => self.use_tree(&mut Vec::new(), &u.tree),
            _ => syn::visit::visit_item(self, item),
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        self.0.push(path.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, path);
    }

    /// A macro's arguments are tokens, not parsed paths (`json!(crate::observe::tcp_flags(..))`).
    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }

    /// Attributes name functions in strings (`#[serde(serialize_with = "crate::counts::..")]`).
    fn visit_attribute(&mut self, attr: &'ast Attribute) {
        if let syn::Meta::List(list) = &attr.meta {
            self.tokens(list.tokens.clone());
        }
    }
}

impl Paths {
    /// The paths in a token stream: `crate`, `super` or `self` and the `::name`s after it,
    /// and each string that holds such a path.
    fn tokens(&mut self, tokens: TokenStream) {
        let mut path: Option<Vec<String>> = None;
        let mut colons = 0;
        for token in tokens {
            match &token {
                TokenTree::Punct(p) if p.as_char() == ':' && path.is_some() => {
                    colons += 1;
                    continue;
                }
                TokenTree::Ident(i) => {
                    let name = i.to_string();
                    match path.as_mut() {
                        Some(p) if colons == 2 => {
                            p.push(name);
                            colons = 0;
                            continue;
                        }
                        _ => {}
                    }
                    self.0.extend(path.take());
                    if matches!(name.as_str(), "crate" | "super" | "self") {
                        path = Some(vec![name]);
                    }
                    colons = 0;
                    continue;
                }
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Literal(l) => {
                    if let Ok(syn::Lit::Str(s)) = syn::parse_str::<syn::Lit>(&l.to_string()) {
                        let text = s.value();
                        if text.starts_with("crate::") || text.starts_with("super::") {
                            self.0.push(text.split("::").map(str::to_owned).collect());
                        }
                    }
                }
                TokenTree::Punct(_) => {}
            }
            self.0.extend(path.take());
            colons = 0;
        }
        self.0.extend(path);
    }
}

/// The module a path written in `here` reaches, if it reaches one of the crate's.
fn reached(
    mods: &BTreeMap<Module, Vec<PathBuf>>,
    here: &Module,
    path: &[String],
) -> Option<Module> {
    let mut at: Module = match path.first()?.as_str() {
        "crate" => Vec::new(),
        "self" | "super" => here.clone(),
        // A child module named without `self::`.
        first if mods.contains_key(&[&here[..], &[first.to_owned()]].concat()) => here.clone(),
        _ => return None,
    };
    let mut rest = path;
    if matches!(path[0].as_str(), "crate" | "self") {
        rest = &path[1..];
    }
    while let Some(("super", tail)) = rest.split_first().map(|(s, t)| (s.as_str(), t)) {
        at.pop()?;
        rest = tail;
    }
    // The longest prefix that is a module.
    let mut found = None;
    for seg in rest {
        at.push(seg.clone());
        if !mods.contains_key(&at) {
            break;
        }
        found = Some(at.clone());
    }
    found
}

/// Each module's dependencies on others of its crate, ancestors left out.
fn dependencies(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mods = modules(src);
    let mut deps = BTreeMap::new();
    for (here, files) in &mods {
        let mut paths = Paths::default();
        for file in files {
            let text = fs::read_to_string(file).unwrap();
            let parsed =
                syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            paths.visit_file(&parsed);
        }
        let to: BTreeSet<Module> = paths
            .0
            .iter()
            .filter_map(|p| reached(&mods, here, p))
            .filter(|m| !here.starts_with(m))
            .collect();
        deps.insert(here.clone(), to);
    }
    deps
}

/// The groups of modules that reach each other (strongly connected, more than one).
fn cycles(deps: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<BTreeSet<Module>> {
    let reach = |from: &Module| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            for d in deps.get(&m).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&Module, BTreeSet<Module>> = deps.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<BTreeSet<Module>> = Vec::new();
    for (m, r) in &reaches {
        let group: BTreeSet<Module> = r
            .iter()
            .filter(|o| reaches.get(o).is_some_and(|back| back.contains(*m)))
            .cloned()
            .collect();
        if group.len() > 1 && !out.contains(&group) {
            out.push(group);
        }
    }
    out
}

fn describe(group: &BTreeSet<Module>, deps: &BTreeMap<Module, BTreeSet<Module>>) -> String {
    let name = |m: &Module| m.join("::");
    let mut edges = Vec::new();
    for m in group {
        for d in deps[m].iter().filter(|d| group.contains(*d)) {
            edges.push(format!("{} -> {}", name(m), name(d)));
        }
    }
    edges.join(", ")
}

#[test]
fn modules_depend_one_way_within_each_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut found = Vec::new();
    for krate in CRATES {
        let deps = dependencies(&root.join(krate));
        assert!(deps.len() > 1, "{krate}: no modules found");
        for group in cycles(&deps) {
            found.push(format!("{krate}: {}", describe(&group, &deps)));
        }
    }
    assert!(found.is_empty(), "modules that use each other:\n{}", found.join("\n"));
}

/// The check finds a cycle however it is closed, and none through a test module or an
/// ancestor.
#[test]
fn a_cycle_is_found() {
    /// Removed however the test ends.
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!("xdpgate-layers-{}", std::process::id())));
    let dir = &dir.0;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    };
    write("lib.rs", "mod a; mod b; mod c; pub fn root() {}");
    write("a.rs", "use crate::b::{self, f};\npub fn g() { crate::root() }");
    write("b.rs", "pub fn f() { super::c::h() }\n#[cfg(test)]\nmod tests { use crate::a; }");
    write("c/mod.rs", "mod d;\npub fn h() {}");
    write("c/d.rs", "use super::h;\nfn e() { crate::c::h() }");
    let deps = dependencies(dir);
    assert!(cycles(&deps).is_empty(), "{deps:?}");
    // Closed by a path in a body, in a macro's arguments, in an attribute's string.
    for closing in [
        "pub fn h() { crate::a::g() }",
        "pub fn h() { let _ = vec![crate::a::g()]; }",
        "#[derive(serde::Serialize)]\npub struct H(#[serde(serialize_with = \"crate::a::g\")] u8);",
    ] {
        write("c/mod.rs", &format!("mod d;\n{closing}"));
        let deps = dependencies(dir);
        let found = cycles(&deps);
        assert_eq!(found.len(), 1, "{closing}: {deps:?}");
        assert_eq!(describe(&found[0], &deps), "a -> b, b -> c, c -> a", "{closing}");
    }
}
