//! The module graph of deadbolt-core has no cycle and its layers hold
//! (DESIGN.md, "Crates and layers": lower layers never reach up).
//!
//! Layers, lower to upper: the base (every top-level module but the three
//! below), `defense`, and above it `pipeline` and `byom` side by side. The
//! base names nothing of `defense`, `pipeline` or `byom`; `defense` names
//! nothing of `pipeline` or `byom`; `pipeline` and `byom` name nothing of
//! each other.
//!
//! Every `.rs` file under `src/` is parsed with `syn`; every path the code
//! names — `use` trees (grouped, nested, renamed, globbed), `use super::…`,
//! inline paths such as `crate::x::y(…)` in expressions, types and patterns,
//! and paths inside macro invocations (`assert!(crate::x::y())`) — is
//! resolved to an absolute module path and attributed to the top-level module
//! it names (`src/foo.rs` and `src/foo/mod.rs` are module `foo`; anything
//! nested under `foo` counts as `foo`), except that inside the layers
//! `defense`, `pipeline` and `byom` each child module is a node of its own
//! (`defense::prune`), so a cycle inside a layer is found too. An edge
//! `a -> b` means code in `a` names something in `b`. Doc comments (intra-doc links) are not
//! dependencies and are not counted; test modules inside a file are.
//!
//! The test fails naming each cycle as a chain of modules, with the paths
//! that make each edge.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};

/// `a -> b` with the files and paths that make it.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// The top-level modules that are layers above the base, lowest first;
/// their child modules are nodes of the graph.
const LAYERS: [&str; 3] = ["defense", "pipeline", "byom"];

/// What each layer may not name.
const FORBIDDEN: [(&str, &[&str]); 4] = [
    ("base", &["defense", "pipeline", "byom"]),
    ("defense", &["pipeline", "byom"]),
    ("pipeline", &["byom"]),
    ("byom", &["pipeline"]),
];

/// The graph node of an absolute module path: its top-level module, or in
/// a layer, the layer's child module it lies in.
fn node(abs: &[String], modules: &BTreeSet<Vec<String>>) -> Option<String> {
    let head = abs.first()?;
    if LAYERS.contains(&head.as_str()) && abs.len() > 1 && modules.contains(&abs[..2].to_vec()) {
        return Some(format!("{head}::{}", abs[1]));
    }
    Some(head.clone())
}

/// The layer a node belongs to: `defense`, `pipeline`, `byom` or `base`.
fn layer_of(node: &str) -> &str {
    let head = node.split("::").next().unwrap_or(node);
    LAYERS
        .iter()
        .find(|l| **l == head)
        .copied()
        .unwrap_or("base")
}

/// One line per edge that reaches where its layer may not.
fn layer_violations(graph: &Graph) -> Vec<String> {
    let mut out = Vec::new();
    for (from, next) in graph {
        let layer = layer_of(from);
        let forbidden = FORBIDDEN
            .iter()
            .find(|(l, _)| *l == layer)
            .map_or(&[][..], |(_, f)| *f);
        for (to, why) in next {
            if forbidden.contains(&layer_of(to)) {
                let why: Vec<&String> = why.iter().take(3).collect();
                out.push(format!("{layer}: {from} -> {to}: {why:?}"));
            }
        }
    }
    out
}

/// A source file: its path relative to `src/` and its text.
struct Source {
    rel: String,
    text: String,
}

/// The module path a file defines: `lib.rs` -> [], `foo.rs` and
/// `foo/mod.rs` -> [foo], `foo/bar.rs` -> [foo, bar].
fn file_module(rel: &str) -> Vec<String> {
    let stem = rel.strip_suffix(".rs").expect("a .rs file");
    let mut parts: Vec<String> = stem.split('/').map(str::to_string).collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    if parts == ["lib"] {
        parts.clear();
    }
    parts
}

/// Every module that exists: one per file, one per inline `mod x { … }`
/// and one per `mod x;` declaration.
fn all_modules(files: &[(Vec<String>, &Source, syn::File)]) -> BTreeSet<Vec<String>> {
    struct Mods<'a> {
        stack: Vec<String>,
        out: &'a mut BTreeSet<Vec<String>>,
    }
    impl<'ast> Visit<'ast> for Mods<'_> {
        fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
            self.stack.push(m.ident.to_string());
            self.out.insert(self.stack.clone());
            visit::visit_item_mod(self, m);
            self.stack.pop();
        }
    }
    let mut out = BTreeSet::new();
    for (module, _, ast) in files {
        out.insert(module.clone());
        Mods {
            stack: module.clone(),
            out: &mut out,
        }
        .visit_file(ast);
    }
    out
}

/// Flattens a use tree into (path, name it binds) leaves:
/// `crate::{a, b::{c as d}, e::*}` -> `crate::a` (a), `crate::b::c` (d),
/// `crate::e` (*). A trailing `self` (`use x::{self}`) names `x`.
fn use_leaves(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_leaves(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let name = n.ident.to_string();
            if name == "self" {
                out.push((prefix.clone(), prefix.last().cloned().unwrap_or_default()));
            } else {
                let mut path = prefix.clone();
                path.push(name.clone());
                out.push((path, name));
            }
        }
        syn::UseTree::Rename(r) => {
            let name = r.ident.to_string();
            let mut path = prefix.clone();
            if name != "self" {
                path.push(name);
            }
            out.push((path, r.rename.to_string()));
        }
        syn::UseTree::Glob(_) => out.push((prefix.clone(), "*".into())),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_leaves(t, prefix, out);
            }
        }
    }
}

/// Resolves a path named inside module `here` to an absolute module path,
/// or None when it names nothing of this crate (an extern crate, a local
/// item, a name brought in by a `use` already counted).
fn resolve(
    here: &[String],
    segs: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let first = segs.first()?;
    match first.as_str() {
        "crate" => Some(segs[1..].to_vec()),
        "super" | "self" => {
            let mut base = here.to_vec();
            let mut rest = segs;
            if first == "self" {
                rest = &segs[1..];
            }
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }
        _ => {
            // 2018 paths: a first segment that is a child module of `here`.
            let mut child = here.to_vec();
            child.push(first.clone());
            modules.contains(&child).then(|| {
                let mut abs = here.to_vec();
                abs.extend(segs.iter().cloned());
                abs
            })
        }
    }
}

/// Splits macro tokens we could not parse as expressions into words and
/// `::`, skipping string and char literals, and returns the paths that start
/// with `crate`, `super` or `self`.
fn token_paths(tokens: &str) -> Vec<Vec<String>> {
    #[derive(PartialEq)]
    enum Tok {
        Word(String),
        Sep,
        Other,
    }
    let mut toks = Vec::new();
    let mut chars = tokens.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            let mut escaped = false;
            for d in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if d == '\\' {
                    escaped = true;
                } else if d == '"' {
                    break;
                }
            }
            toks.push(Tok::Other);
        } else if c.is_alphanumeric() || c == '_' {
            let mut w = c.to_string();
            while let Some(&d) = chars.peek() {
                if d.is_alphanumeric() || d == '_' {
                    w.push(d);
                    chars.next();
                } else {
                    break;
                }
            }
            toks.push(Tok::Word(w));
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            toks.push(Tok::Sep);
        } else if !c.is_whitespace() {
            toks.push(Tok::Other);
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let starts = matches!(&toks[i], Tok::Word(w) if w == "crate" || w == "super" || w == "self")
            && (i == 0 || toks[i - 1] != Tok::Sep);
        if !starts {
            i += 1;
            continue;
        }
        let mut path = Vec::new();
        while let Some(Tok::Word(w)) = toks.get(i) {
            path.push(w.clone());
            if toks.get(i + 1) == Some(&Tok::Sep) {
                i += 2;
            } else {
                i += 1;
                break;
            }
        }
        if path.len() > 1 {
            out.push(path);
        }
    }
    out
}

/// Walks one file and records an edge for every path that names another
/// top-level module.
struct Walker<'a> {
    modules: &'a BTreeSet<Vec<String>>,
    /// Names `lib.rs` re-exports (`pub use error::{Error, Result}`) ->
    /// the top-level module they come from.
    root_exports: &'a BTreeMap<String, String>,
    stack: Vec<String>,
    file: &'a str,
    graph: &'a mut Graph,
}

impl Walker<'_> {
    fn record(&mut self, segs: &[String]) {
        let Some(abs) = resolve(&self.stack, segs, self.modules) else {
            return;
        };
        let Some(from) = node(&self.stack, self.modules) else {
            return; // lib.rs itself declares the modules
        };
        let Some(head) = abs.first() else {
            return; // the crate root
        };
        let to = if self.modules.contains(&vec![head.clone()]) {
            node(&abs, self.modules).unwrap_or_else(|| head.clone())
        } else if let Some(m) = self.root_exports.get(head) {
            m.clone()
        } else {
            return;
        };
        if to != from {
            self.graph
                .entry(from.clone())
                .or_default()
                .entry(to)
                .or_default()
                .insert(format!("{}: {}", self.file, segs.join("::")));
        }
    }
}

impl<'ast> Visit<'ast> for Walker<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if let Some((_, items)) = &m.content {
            self.stack.push(m.ident.to_string());
            for item in items {
                self.visit_item(item);
            }
            self.stack.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if u.leading_colon.is_some() {
            return; // `use ::extern_crate…`
        }
        let mut leaves = Vec::new();
        use_leaves(&u.tree, &mut Vec::new(), &mut leaves);
        for (path, _) in leaves {
            self.record(&path);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() {
            let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            self.record(&segs);
        }
        visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        visit::visit_macro(self, m);
        match m.parse_body_with(Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated) {
            Ok(exprs) => {
                for e in &exprs {
                    self.visit_expr(e);
                }
            }
            Err(_) => {
                for path in token_paths(&m.tokens.to_string()) {
                    self.record(&path);
                }
            }
        }
    }

    // `pub(in crate::x)` / `pub(super)` restrict visibility; they are no
    // dependency.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}
}

/// The top-level module graph of a crate given as `src/`-relative files.
fn module_graph(sources: &[Source]) -> Graph {
    let files: Vec<(Vec<String>, &Source, syn::File)> = sources
        .iter()
        .map(|s| {
            let ast = syn::parse_file(&s.text)
                .unwrap_or_else(|e| panic!("src/{} does not parse: {e}", s.rel));
            (file_module(&s.rel), s, ast)
        })
        .collect();
    let modules = all_modules(&files);

    let mut root_exports = BTreeMap::new();
    for (module, _, ast) in &files {
        if !module.is_empty() {
            continue;
        }
        for item in &ast.items {
            if let syn::Item::Use(u) = item {
                let mut leaves = Vec::new();
                use_leaves(&u.tree, &mut Vec::new(), &mut leaves);
                for (path, name) in leaves {
                    let top = resolve(&[], &path, &modules)
                        .and_then(|abs| abs.first().cloned())
                        .filter(|head| modules.contains(&vec![head.clone()]));
                    if let Some(top) = top {
                        root_exports.insert(name, top);
                    }
                }
            }
        }
    }

    let mut graph = Graph::new();
    for (module, source, ast) in &files {
        Walker {
            modules: &modules,
            root_exports: &root_exports,
            stack: module.clone(),
            file: &source.rel,
            graph: &mut graph,
        }
        .visit_file(ast);
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn cyclic_components(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    fn connect<'g>(s: &mut State<'g>, v: &'g str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(next) = s.graph.get(v) {
            for w in next.keys() {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    connect(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    let nodes: BTreeSet<&str> = graph
        .iter()
        .flat_map(|(a, next)| std::iter::once(a.as_str()).chain(next.keys().map(String::as_str)))
        .collect();
    for v in nodes {
        if !s.index.contains_key(v) {
            connect(&mut s, v);
        }
    }
    s.out.sort();
    s.out
}

/// A shortest cycle through the first module of a component:
/// `[a, b, c, a]`.
fn one_cycle(graph: &Graph, comp: &[String]) -> Vec<String> {
    let start = &comp[0];
    let inside: BTreeSet<&String> = comp.iter().collect();
    let mut prev: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph.get(v).into_iter().flat_map(|n| n.keys()) {
            if !inside.contains(w) {
                continue;
            }
            if w == start {
                let mut chain = vec![start.clone()];
                let mut at = v;
                while at != start {
                    chain.push(at.clone());
                    at = prev[at];
                }
                chain.push(start.clone());
                chain.reverse();
                return chain;
            }
            if !prev.contains_key(w) {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("a strongly connected component has a cycle")
}

/// One line per cycle: the chain, then the paths that make each edge.
fn describe_cycles(graph: &Graph) -> Vec<String> {
    cyclic_components(graph)
        .iter()
        .map(|comp| {
            let chain = one_cycle(graph, comp);
            let mut line = format!(
                "cycle {} (component: {})",
                chain.join(" -> "),
                comp.join(", ")
            );
            for pair in chain.windows(2) {
                let why: Vec<&String> = graph[&pair[0]][&pair[1]].iter().take(3).collect();
                line.push_str(&format!("\n    {} -> {}: {:?}", pair[0], pair[1], why));
            }
            line
        })
        .collect()
}

fn read_sources(root: &Path) -> Vec<Source> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<Source>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(root).unwrap();
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push(Source {
                    rel,
                    text: std::fs::read_to_string(&p).unwrap(),
                });
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// Modules in dependency order, lowest first (a module only after all it
/// names), for the log.
fn layers(graph: &Graph, modules: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    while placed.len() < modules.len() {
        let layer: Vec<String> = modules
            .iter()
            .filter(|m| !placed.contains(*m))
            .filter(|m| {
                graph
                    .get(*m)
                    .is_none_or(|next| next.keys().all(|n| placed.contains(n)))
            })
            .cloned()
            .collect();
        if layer.is_empty() {
            break; // a cycle: reported elsewhere
        }
        placed.extend(layer.iter().cloned());
        out.push(layer);
    }
    out
}

#[test]
fn core_module_graph_has_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let sources = read_sources(&src);
    assert!(sources.len() > 20, "read only {} files", sources.len());
    let graph = module_graph(&sources);
    let files: BTreeSet<Vec<String>> = sources.iter().map(|s| file_module(&s.rel)).collect();
    let modules: BTreeSet<String> = files.iter().filter_map(|m| node(m, &files)).collect();
    for layer in LAYERS {
        assert!(modules.contains(layer), "no module {layer}: {modules:?}");
    }
    // The walker sees the dependencies we know are there.
    assert!(graph["train"].contains_key("optim"), "{graph:#?}");
    assert!(graph["eval"].contains_key("model"), "{graph:#?}");
    assert!(
        graph["pipeline::experiment"].contains_key("defense::cleanse"),
        "{graph:#?}"
    );
    assert!(
        graph["byom::scan"].contains_key("defense::cleanse"),
        "{graph:#?}"
    );
    assert!(
        graph["defense::search"].contains_key("defense::prune"),
        "{graph:#?}"
    );
    for (i, layer) in layers(&graph, &modules).iter().enumerate() {
        eprintln!("layer {i}: {}", layer.join(", "));
    }
    let cycles = describe_cycles(&graph);
    assert!(
        cycles.is_empty(),
        "deadbolt-core's module graph has {} cycle(s):\n{}",
        cycles.len(),
        cycles.join("\n")
    );
}

/// The base names nothing of the layers; `defense` names nothing of
/// `pipeline` or `byom`; `pipeline` and `byom` name nothing of each other.
#[test]
fn layers_only_reach_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&read_sources(&src));
    let broken = layer_violations(&graph);
    assert!(
        broken.is_empty(),
        "layer rules broken:\n{}",
        broken.join("\n")
    );
}

fn fixture(files: &[(&str, &str)]) -> Graph {
    let sources: Vec<Source> = files
        .iter()
        .map(|(rel, text)| Source {
            rel: rel.to_string(),
            text: text.to_string(),
        })
        .collect();
    module_graph(&sources)
}

fn edges(graph: &Graph) -> BTreeSet<(String, String)> {
    graph
        .iter()
        .flat_map(|(a, next)| next.keys().map(move |b| (a.clone(), b.clone())))
        .collect()
}

fn edge(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

/// The walker sees each way a path can name another module, and only those.
#[test]
fn walker_sees_every_kind_of_path() {
    let g = fixture(&[
        (
            "lib.rs",
            "pub mod a; pub mod b; pub mod c; pub mod d; pub mod e; pub mod f; pub mod g;
             pub mod h; pub mod error; pub use error::{Error, Result as R}; pub use ext as spec;",
        ),
        // grouped and nested imports
        ("a.rs", "use crate::{b, c::{x::{self, Y}}};"),
        // an inline path in an expression, nothing imported
        ("b/mod.rs", "mod inner; fn f() { let _ = crate::d::g(1); }"),
        // super from a nested file reaches the parent's sibling
        ("b/inner.rs", "use super::super::e::Thing;"),
        // inside a macro invocation, parsed and unparsed
        (
            "c/mod.rs",
            "fn t() { assert!(crate::f::ok()); matches!(x, crate::g::K { .. }); }",
        ),
        // the crate root's re-exports are attributed to their module
        ("d.rs", "fn f() -> crate::R<()> { Err(crate::Error::X) }"),
        // doc links, strings, extern paths, visibility and local names are no edges
        (
            "e.rs",
            "//! see [`crate::a::x`]\n
             pub(in crate::a) fn f() { let s = \"crate::a::x\"; println!(\"crate::b {}\", s);
               ::ext::a::f(); spec::x(); }",
        ),
        // a test module's `use super::*` is the module itself
        (
            "f.rs",
            "#[cfg(test)] mod tests { use super::*; use crate::h::helper; }",
        ),
        ("g.rs", ""),
        ("h.rs", ""),
        ("error.rs", ""),
    ]);
    let want: BTreeSet<_> = [
        edge("a", "b"),
        edge("a", "c"),
        edge("b", "d"),
        edge("b", "e"),
        edge("c", "f"),
        edge("c", "g"),
        edge("d", "error"),
        edge("f", "h"),
    ]
    .into_iter()
    .collect();
    assert_eq!(edges(&g), want);
    assert!(describe_cycles(&g).is_empty());
}

/// A cycle is found and named, however its edges are written.
#[test]
fn checker_names_cycles() {
    let g = fixture(&[
        (
            "lib.rs",
            "pub mod experiment; pub mod repair; pub mod scan; pub mod defense;",
        ),
        (
            "experiment.rs",
            "use crate::{defense, repair::{self, search_k}};",
        ),
        ("repair.rs", "use crate::scan::{self, figure};"),
        (
            "scan/mod.rs",
            "mod region; fn f() { crate::defense::norms(); }",
        ),
        (
            "scan/region.rs",
            "fn r(t: &T) { super::super::experiment::trigger_region(t) }",
        ),
        ("defense.rs", ""),
    ]);
    let cycles = describe_cycles(&g);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].starts_with("cycle experiment -> repair -> scan -> experiment"),
        "{}",
        cycles[0]
    );
    assert!(
        cycles[0].contains("scan/region.rs: super::super::experiment::trigger_region"),
        "{}",
        cycles[0]
    );

    // Two separate cycles are both reported.
    let g = fixture(&[
        ("lib.rs", "mod a; mod b; mod c; mod d;"),
        ("a.rs", "use crate::b::X;"),
        ("b.rs", "fn f() { crate::a::g() }"),
        ("c.rs", "use super::d::Y;"),
        ("d.rs", "fn f() { vec![crate::c::Z]; }"),
    ]);
    let cycles = describe_cycles(&g);
    assert_eq!(cycles.len(), 2, "{cycles:?}");
    assert!(cycles[0].starts_with("cycle a -> b -> a"), "{cycles:?}");
    assert!(cycles[1].starts_with("cycle c -> d -> c"), "{cycles:?}");
}

/// Each layer rule bites, however the edge is written, and edges that
/// reach down pass; inside a layer, each child module is a node, so a
/// cycle between two of them is found.
#[test]
fn layer_rules_bite() {
    let g = fixture(&[
        (
            "lib.rs",
            "pub mod data; pub mod eval; pub mod defense; pub mod pipeline; pub mod byom;",
        ),
        ("data.rs", "use crate::defense::stats::Norm;"),
        (
            "eval.rs",
            "fn f() { crate::pipeline::run(); let _ = crate::byom::scan::open(); }",
        ),
        ("defense/mod.rs", "pub mod stats; pub mod prune;"),
        ("defense/stats.rs", "use crate::data::Dataset;"),
        (
            "defense/prune.rs",
            "use super::stats; use crate::{eval, pipeline::report::Report};
             fn f() { assert!(crate::byom::card::ok()); }",
        ),
        ("pipeline/mod.rs", "pub mod report; pub fn run() {}"),
        (
            "pipeline/report.rs",
            "use crate::defense::prune; use super::super::byom::scan::Verdict;",
        ),
        ("byom/mod.rs", "pub mod card; pub mod scan;"),
        ("byom/card.rs", "use crate::eval::predict;"),
        (
            "byom/scan.rs",
            "use super::card; fn f() -> crate::pipeline::report::Report { todo!() }",
        ),
    ]);
    let mut broken: Vec<String> = layer_violations(&g)
        .iter()
        .map(|l| l.split(": [").next().unwrap_or_default().to_string())
        .collect();
    broken.sort();
    assert_eq!(
        broken,
        [
            "base: data -> defense::stats",
            "base: eval -> byom::scan",
            "base: eval -> pipeline",
            "byom: byom::scan -> pipeline::report",
            "defense: defense::prune -> byom::card",
            "defense: defense::prune -> pipeline::report",
            "pipeline: pipeline::report -> byom::scan",
        ]
    );
    // edges that reach down or stay in a layer are no violation
    let e = edges(&g);
    for ok in [
        edge("defense::stats", "data"),
        edge("defense::prune", "defense::stats"),
        edge("defense::prune", "eval"),
        edge("pipeline::report", "defense::prune"),
        edge("byom::card", "eval"),
        edge("byom::scan", "byom::card"),
    ] {
        assert!(e.contains(&ok), "{ok:?} not in {e:?}");
    }

    // a cycle inside a layer
    let g = fixture(&[
        ("lib.rs", "pub mod defense;"),
        ("defense/mod.rs", "pub mod prune; pub mod search;"),
        ("defense/prune.rs", "use super::search::k_ladder;"),
        (
            "defense/search.rs",
            "fn f() { crate::defense::prune::rank(); }",
        ),
    ]);
    let cycles = describe_cycles(&g);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].starts_with("cycle defense::prune -> defense::search -> defense::prune"),
        "{}",
        cycles[0]
    );
}
