//! The crate's modules form layers (see `src/lib.rs`): a module names only
//! modules of its own layer or below, and no modules name each other,
//! directly or round a loop. This reads every `crate::` path in the
//! sources (comments aside) and checks both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, lowest first; a module's layer is its first path segment.
const LAYERS: &[&[&str]] = &[
    &["ids", "error"],
    &["fleet"],
    &["security"],
    &["artifacts"],
    &["control_plane"],
    &["data_plane"],
    &["api"],
    &["fuzzing"],
];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next()?;
    LAYERS.iter().position(|layer| layer.contains(&top))
}

/// `a::b` for `src/a/b.rs` and `src/a/b/mod.rs`; None for the crate root.
fn module_name(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [] => None,
        [only] if only == "lib" => None,
        [first, ..] if first == "bin" => None,
        _ => Some(parts.join("::")),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each `crate::x::y` path in `source`, outside comments, resolved to the
/// longest module in `modules` it starts with.
fn references(source: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (at, _) in code.match_indices("crate::") {
            let path: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            if let Some(target) = (1..=segments.len())
                .rev()
                .map(|n| segments[..n].join("::"))
                .find(|candidate| modules.contains(candidate))
            {
                found.insert(target);
            }
        }
    }
    found
}

fn crate_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let named: Vec<(String, String)> = files
        .iter()
        .filter_map(|f| Some((module_name(src, f)?, std::fs::read_to_string(f).unwrap())))
        .collect();
    let modules: BTreeSet<String> = named.iter().map(|(m, _)| m.clone()).collect();
    named
        .iter()
        .map(|(module, source)| {
            let mut targets = references(source, &modules);
            // A folder's mod.rs declaring its children is not an arrow.
            targets.retain(|t| t != module && !t.starts_with(&format!("{module}::")));
            (module.clone(), targets)
        })
        .collect()
}

/// An arrow from a lower layer to a higher one, or a module outside the
/// layers, as a message.
fn layer_violations(graph: &Graph) -> Vec<String> {
    let mut violations = Vec::new();
    for (from, targets) in graph {
        let Some(from_layer) = layer_of(from) else {
            violations.push(format!("{from} is in no layer"));
            continue;
        };
        for to in targets {
            if layer_of(to).is_some_and(|l| l > from_layer) {
                violations.push(format!("{from} (a lower layer) uses {to}"));
            }
        }
    }
    violations
}

/// A loop of modules, if there is one: depth-first search for an arrow
/// back to a module on the current path.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn modules_use_only_their_own_layer_and_those_below_without_loops() {
    let graph = crate_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.len() > 20, "read only {} modules", graph.len());
    assert!(
        graph["data_plane::router"].contains("data_plane::environment"),
        "the reader missed a known arrow: {graph:?}"
    );
    let violations = layer_violations(&graph);
    assert!(violations.is_empty(), "{violations:#?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("modules use each other: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_checks_see_a_loop_and_an_upward_arrow() {
    let modules: BTreeSet<String> = ["security::auth", "security::role_credentials", "api"]
        .map(String::from)
        .into();
    let auth = references(
        "use crate::security::role_credentials::Issuer; // crate::api in a comment\n\
         fn f() -> crate::api::Thing {}",
        &modules,
    );
    let issuer = references("use crate::security::auth::{hmac, AccountId};", &modules);
    let graph: Graph = [
        ("security::auth".to_string(), auth),
        ("security::role_credentials".to_string(), issuer),
    ]
    .into();
    assert_eq!(
        find_cycle(&graph).unwrap(),
        [
            "security::auth",
            "security::role_credentials",
            "security::auth"
        ]
    );
    assert_eq!(
        layer_violations(&graph),
        ["security::auth (a lower layer) uses api"]
    );
}
