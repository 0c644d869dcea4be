//! Within each crate the modules depend one way, as the crates do (Cargo refuses a cycle of
//! crates; nothing refuses one of modules): no module reaches, by a `crate::`, `super::` or
//! `self::` path (or through what a module re-exports), a module that reaches back. A module
//! may use its ancestors (Rust lets it see their private items for that); a use of another
//! module's child counts as a use of that module too, so two subtrees depend one way as
//! wholes. Test modules (`#[cfg(test)]`) are not counted.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use proc_macro2::{TokenStream, TokenTree};
use syn::{Attribute, Item, UseTree, visit::Visit};

/// A module's path in its crate (`["bgp", "announce"]`; the root is empty).
type Module = Vec<String>;

/// The source folders of the workspace's crates (their libraries' and programs').
fn crates() -> BTreeSet<PathBuf> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().unwrap();
    let mut dirs = BTreeSet::new();
    for package in metadata.workspace_packages() {
        for target in &package.targets {
            if target.is_lib() || target.is_bin() {
                dirs.insert(target.src_path.parent().unwrap().as_std_path().to_path_buf());
            }
        }
    }
    dirs
}

/// Each module's source files (a crate's library and programs share the root).
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
            // Not an editor's lock link, say.
            if !path.is_file() || path.extension().is_none_or(|e| e != "rs") {
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

/// What one module's files name: the paths in them as written (`crate::flows::addr`,
/// `super::announce`), what they re-export, and the items they define.
#[derive(Default)]
struct Names {
    paths: Vec<Vec<String>>,
    /// A `pub use`'s names, each with the path it stands for.
    reexports: Vec<(String, Vec<String>)>,
    /// A `pub use ...::*`'s paths.
    globs: Vec<Vec<String>>,
    items: BTreeSet<String>,
}

impl Names {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &UseTree, public: bool) {
        let leaf = |names: &mut Self, name: &syn::Ident, path: Vec<String>| {
            if public {
                names.reexports.push((name.to_string(), path.clone()));
            }
            names.paths.push(path);
        };
        match tree {
            UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree, public);
                prefix.pop();
            }
            UseTree::Name(n) if n.ident == "self" => {
                let name = syn::Ident::new(prefix.last().unwrap(), n.ident.span());
                leaf(self, &name, prefix.clone())
            }
            UseTree::Name(n) => {
                leaf(self, &n.ident, [&prefix[..], &[n.ident.to_string()]].concat())
            }
            UseTree::Rename(r) => {
                leaf(self, &r.rename, [&prefix[..], &[r.ident.to_string()]].concat())
            }
            UseTree::Glob(_) => {
                if public {
                    self.globs.push(prefix.clone());
                }
                self.paths.push(prefix.clone());
            }
            UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(prefix, t, public)),
        }
    }

    /// The paths in a token stream (a macro's arguments, an attribute's): `crate`, `super`
    /// or `self` and the `::name`s after it, and each string that holds such a path.
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
                    if let Some(p) = path.as_mut().filter(|_| colons == 2) {
                        p.push(name);
                        colons = 0;
                        continue;
                    }
                    self.paths.extend(path.take());
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
                        if ["crate::", "super::", "self::"].iter().any(|p| text.starts_with(p)) {
                            self.paths.push(text.split("::").map(str::to_owned).collect());
                        }
                    }
                }
                TokenTree::Punct(_) => {}
            }
            self.paths.extend(path.take());
            colons = 0;
        }
        self.paths.extend(path);
    }
}

impl<'ast> Visit<'ast> for Names {
    fn visit_file(&mut self, file: &'ast syn::File) {
        for item in &file.items {
            let name = match item {
                Item::Const(i) => Some(&i.ident),
                Item::Enum(i) => Some(&i.ident),
                Item::Fn(i) => Some(&i.sig.ident),
                Item::Macro(i) => i.ident.as_ref(),
                Item::Mod(i) => Some(&i.ident),
                Item::Static(i) => Some(&i.ident),
                Item::Struct(i) => Some(&i.ident),
                Item::Trait(i) => Some(&i.ident),
                Item::Type(i) => Some(&i.ident),
                Item::Union(i) => Some(&i.ident),
                _ => None,
            };
            self.items.extend(name.map(ToString::to_string));
        }
        syn::visit::visit_file(self, file);
    }

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
            Item::Use(u) => {
                let public = !matches!(u.vis, syn::Visibility::Inherited);
                self.use_tree(&mut Vec::new(), &u.tree, public)
            }
            _ => syn::visit::visit_item(self, item),
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        self.paths.push(path.segments.iter().map(|s| s.ident.to_string()).collect());
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

/// A crate's modules and what each names.
struct Crate(BTreeMap<Module, Names>);

impl Crate {
    fn read(src: &Path) -> Self {
        let mut out = BTreeMap::new();
        for (module, files) in modules(src) {
            let mut names = Names::default();
            for file in files {
                let text = fs::read_to_string(&file).unwrap();
                let parsed =
                    syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                names.visit_file(&parsed);
            }
            out.insert(module, names);
        }
        Self(out)
    }

    /// The module a path written in `here` reaches, if it reaches one of the crate's: the
    /// module it names, or the one a module re-exports the named item from.
    fn reached(&self, here: &Module, path: &[String], depth: usize) -> Option<Module> {
        let mut at: Module = match path.first()?.as_str() {
            "crate" => Vec::new(),
            "self" | "super" => here.clone(),
            // A child module named without `self::`.
            first if self.0.contains_key(&[&here[..], &[first.to_owned()]].concat()) => {
                here.clone()
            }
            _ => return None,
        };
        let mut rest = if matches!(path[0].as_str(), "crate" | "self") { &path[1..] } else { path };
        while let Some((first, tail)) = rest.split_first()
            && first == "super"
        {
            at.pop()?;
            rest = tail;
        }
        // The longest prefix that is a module, then what it re-exports under the next name.
        let mut found = None;
        for seg in rest {
            at.push(seg.clone());
            if !self.0.contains_key(&at) {
                at.pop();
                if depth < 8 {
                    found = self.reexported(&at, seg, depth + 1).or(found);
                }
                break;
            }
            found = Some(at.clone());
        }
        found
    }

    /// The module `module` takes `name` from by a `pub use`, if any.
    fn reexported(&self, module: &Module, name: &str, depth: usize) -> Option<Module> {
        let names = &self.0[module];
        if let Some((_, path)) = names.reexports.iter().find(|(n, _)| n == name) {
            return self.reached(module, path, depth);
        }
        if names.items.contains(name) {
            return None;
        }
        names.globs.iter().find_map(|glob| {
            let from = self.reached(module, glob, depth)?;
            let defines = self.0[&from].items.contains(name);
            if defines { Some(from) } else { self.reexported(&from, name, depth + 1) }
        })
    }

    /// Each module's dependencies on others of its crate: a use of another subtree's module
    /// is one of each of that module's ancestors below the two's common one, by this
    /// module and each of its own ancestors below it. A use of an ancestor is none.
    fn dependencies(&self) -> BTreeMap<Module, BTreeSet<Module>> {
        let mut deps: BTreeMap<Module, BTreeSet<Module>> =
            self.0.keys().map(|m| (m.clone(), BTreeSet::new())).collect();
        for (here, names) in &self.0 {
            for to in names.paths.iter().filter_map(|p| self.reached(here, p, 0)) {
                if here.starts_with(&to) {
                    continue;
                }
                let common = here.iter().zip(&to).take_while(|(a, b)| a == b).count();
                let froms = if common == here.len() {
                    here.len()..=here.len()
                } else {
                    common + 1..=here.len()
                };
                for i in froms {
                    for j in common + 1..=to.len() {
                        deps.entry(here[..i].to_vec()).or_default().insert(to[..j].to_vec());
                    }
                }
            }
        }
        deps
    }
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
    let crates = crates();
    assert!(crates.len() >= 8, "the workspace's crates: {crates:?}");
    let mut found = Vec::new();
    for src in &crates {
        let deps = Crate::read(src).dependencies();
        assert!(deps.len() > 1, "{}: no modules found", src.display());
        for group in cycles(&deps) {
            found.push(format!("{}: {}", src.display(), describe(&group, &deps)));
        }
    }
    assert!(found.is_empty(), "modules that use each other:\n{}", found.join("\n"));
}

/// A crate written for a test, removed however the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("xdpgate-layers-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) {
        let path = self.0.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn cycles(&self) -> Vec<String> {
        let deps = Crate::read(&self.0).dependencies();
        cycles(&deps).iter().map(|g| describe(g, &deps)).collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The check finds a cycle however it is closed, and none through a test module or an
/// ancestor.
#[test]
fn a_cycle_is_found() {
    let c = Scratch::new("closed");
    c.write("lib.rs", "mod a; mod b; mod c; pub fn root() {}");
    c.write("a.rs", "use crate::b::{self, f};\npub fn g() { crate::root() }");
    c.write("b.rs", "pub fn f() { super::c::h() }\n#[cfg(test)]\nmod tests { use crate::a; }");
    c.write("c/mod.rs", "mod d;\npub fn h() {}");
    c.write("c/d.rs", "use super::h;\nfn e() { crate::c::h() }");
    assert_eq!(c.cycles(), Vec::<String>::new());
    // Closed by a path in a body, in a `use` in a body, in a macro's arguments, in an
    // attribute's string.
    for closing in [
        "pub fn h() { crate::a::g() }",
        "pub fn h() { use crate::a::g; g() }",
        "pub fn h() { let _ = vec![crate::a::g()]; }",
        "#[derive(serde::Serialize)]\npub struct H(#[serde(serialize_with = \"crate::a::g\")] u8);",
    ] {
        c.write("c/mod.rs", &format!("mod d;\n{closing}"));
        assert_eq!(c.cycles(), ["a -> b, b -> c, c -> a"], "{closing}");
    }
}

/// Through a re-export (by name, or a glob), and between subtrees: a module that uses
/// another's child uses that module.
#[test]
fn a_cycle_through_a_reexport_or_a_child_is_found() {
    let c = Scratch::new("reexport");
    c.write("a.rs", "pub fn g() { crate::f() }");
    c.write("b.rs", "pub fn f() { crate::a::g() }");
    for lib in ["mod a; mod b; pub use b::f;", "mod a; mod b; pub use b::*;"] {
        c.write("lib.rs", lib);
        assert_eq!(c.cycles(), ["a -> b, b -> a"], "{lib}");
    }
    c.write("lib.rs", "mod a; mod b; pub fn f() {}");
    assert_eq!(c.cycles(), Vec::<String>::new(), "the root's own f");
    let c = Scratch::new("child");
    c.write("lib.rs", "mod a; mod b;");
    c.write("a/mod.rs", "mod c; pub fn g() { crate::b::f() }");
    c.write("a/c.rs", "pub fn h() {}");
    c.write("b.rs", "pub fn f() { crate::a::c::h() }");
    assert_eq!(c.cycles(), ["a -> b, b -> a"]);
}
