//! Which modules of a crate use which: the graph of a crate's top-level modules, built
//! from `crate::` paths in its sources (line comments left out), and the cycles in it.
//!
//! A module that uses a module that uses it back is one room split in two: neither can be
//! read, tested or moved alone. The workspace's own test (in `tests` here) fails on any
//! cycle in any crate of the workspace.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the other top-level modules of the same crate it uses.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module graph of the crate whose sources are in `src` (`lib.rs` or `main.rs` there).
/// An item the crate root re-exports (`pub use server::{start, NodeHandle};`) counts as a
/// use of the module it comes from.
pub fn module_graph(src: &Path) -> std::io::Result<Graph> {
    let mut files = Vec::new();
    collect(src, src, &mut files)?;
    let mut reexported = BTreeMap::new();
    for (module, text) in &files {
        if module.is_empty() {
            reexported.extend(root_reexports(&strip_comments(text)));
        }
    }
    let mut graph = Graph::new();
    for (module, text) in &files {
        let Some(top) = module.first() else { continue };
        let deps = graph.entry(top.clone()).or_default();
        for used in crate_paths(&strip_comments(text)) {
            let used = reexported.get(&used).cloned().unwrap_or(used);
            if used != *top && files.iter().any(|(m, _)| m.first() == Some(&used)) {
                deps.insert(used);
            }
        }
    }
    Ok(graph)
}

/// Item -> module, for the root's `pub use module::item;` and `pub use module::{a, b};`.
fn root_reexports(code: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in code.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.rsplit(" as ").next().unwrap_or(item).trim();
            let name = name.rsplit("::").next().unwrap_or(name);
            if !name.is_empty() && name != "*" {
                out.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    out
}

/// Every `.rs` file under `dir` with its module path (`a/b.rs` and `a/b/mod.rs`:
/// `["a", "b"]`; `lib.rs`, `main.rs`: `[]`).
fn collect(root: &Path, dir: &Path, out: &mut Vec<(Vec<String>, String)>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            collect(root, &path, out)?;
            continue;
        }
        if path.extension().and_then(|x| x.to_str()) != Some("rs") {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .with_extension("");
        let mut module: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        if matches!(
            module.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            module.pop();
        }
        out.push((module, std::fs::read_to_string(&path)?));
    }
    Ok(())
}

/// `text` without `//` comments (doc comments included). Block comments are left in (the
/// workspace has none, and `/*` occurs in strings and paths); a `//` inside a string literal
/// ends the line's code here, which can only hide a dependency, never invent one.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every `crate::` path in `code` (a module, or an item of the crate
/// root), including each item of a `crate::{a, b::c}` group.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        if code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '$')
        {
            continue; // `$crate::`, `ca_state::crate::` and the like
        }
        let after = &code[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 0usize;
            let mut start = true;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        found.insert(ident(&group[k..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(after));
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

/// The cycles of `graph`: each strongly connected set of two or more modules, sorted.
pub fn cycles(graph: &Graph) -> Vec<BTreeSet<String>> {
    // Tarjan's algorithm.
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut set = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                set.insert(w.to_owned());
                if w == v {
                    break;
                }
            }
            if set.len() > 1 {
                s.out.push(set);
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
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out.sort();
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &str)]) -> Graph {
        let mut g = Graph::new();
        for (a, b) in edges {
            g.entry((*a).into()).or_default().insert((*b).into());
            g.entry((*b).into()).or_default();
        }
        g
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn paths_are_read_from_code_not_comments() {
        let code = "//! see [`crate::docs`]\nuse crate::{a::X, b, c::{d, e}};\nfn f() { crate::g::h(); } // crate::nope\nlet s = $crate::mac;";
        assert_eq!(
            crate_paths(&strip_comments(code)),
            set(&["a", "b", "c", "g"])
        );
        let root = "pub use server::{start, NodeHandle};\npub use error::Error;";
        let r = root_reexports(root);
        assert_eq!(r["NodeHandle"], "server");
        assert_eq!(r["start"], "server");
        assert_eq!(r["Error"], "error");
    }

    #[test]
    fn cycles_are_found_and_layers_are_not() {
        let layered = graph(&[("api", "core"), ("core", "state"), ("api", "state")]);
        assert!(cycles(&layered).is_empty());
        let tangled = graph(&[
            ("a", "b"),
            ("b", "c"),
            ("c", "a"),
            ("d", "e"),
            ("e", "d"),
            ("f", "a"),
        ]);
        assert_eq!(cycles(&tangled), [set(&["a", "b", "c"]), set(&["d", "e"])]);
    }

    #[test]
    fn no_crate_of_the_workspace_has_a_module_cycle() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut found = Vec::new();
        let mut crates: Vec<_> = std::fs::read_dir(&workspace)
            .expect("workspace")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("Cargo.toml").is_file() && e.path().join("src").is_dir())
            .collect();
        crates.sort_by_key(|e| e.path());
        for c in crates {
            let name = c.file_name().to_string_lossy().into_owned();
            let g = module_graph(&c.path().join("src")).expect("readable sources");
            for cycle in cycles(&g) {
                found.push((name.clone(), cycle));
            }
        }
        assert!(
            found.is_empty(),
            "module cycles (crate folder, modules): {found:?}"
        );
    }
}
