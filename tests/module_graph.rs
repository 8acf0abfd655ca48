//! The modules of `src/` form no import cycle: no module uses one that uses
//! it back, directly or through others. Each `.rs` file is a module; a
//! module uses another when its code (tests and comments aside) names a path
//! into it: `crate::…`, `super::…`, `self::…`, or one of its own submodules
//! by name (`tcp::visit`). Run alone: `cargo test --test module_graph`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path, `["node", "tunnels"]`; the crate root is empty.
type Module = Vec<String>;

fn module_of(src: &Path, file: &Path) -> Option<Module> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    match last.as_str() {
        // The binary's root is its own crate.
        "main.rs" if parts.is_empty() => return None,
        "lib.rs" if parts.is_empty() => {}
        "mod.rs" => {}
        other => parts.push(other.strip_suffix(".rs")?.to_string()),
    }
    Some(parts)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code that counts: up to the test module, without comment lines.
fn code_of(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Submodules a file declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn declared(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub ")
                .or_else(|| l.strip_prefix("pub(crate) "));
            let rest = rest.unwrap_or(l).strip_prefix("mod ")?;
            Some(rest.strip_suffix(';')?.trim().to_string())
        })
        .collect()
}

/// Paths named after `start` in `code`: `a::b::{c, d::e}` gives `[a,b,c]`
/// and `[a,b,d,e]`.
fn paths_at(code: &str, start: usize) -> Vec<Vec<String>> {
    let bytes: Vec<char> = code[start..].chars().collect();
    let mut i = 0;
    let mut segs = Vec::new();
    loop {
        let begin = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        if i > begin {
            segs.push(bytes[begin..i].iter().collect::<String>());
        }
        if bytes.get(i) == Some(&':') && bytes.get(i + 1) == Some(&':') {
            i += 2;
            if bytes.get(i) == Some(&'{') {
                // A group: each item is a path below `segs`.
                let mut depth = 0;
                let mut item = String::new();
                let mut items = Vec::new();
                for &c in &bytes[i..] {
                    match c {
                        '{' => {
                            depth += 1;
                            if depth > 1 {
                                item.push(c);
                            }
                        }
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                items.push(std::mem::take(&mut item));
                                break;
                            }
                            item.push(c);
                        }
                        ',' if depth == 1 => items.push(std::mem::take(&mut item)),
                        c => item.push(c),
                    }
                }
                return items
                    .iter()
                    .flat_map(|it| {
                        let it = it.trim();
                        if it.is_empty() || it == "self" {
                            return vec![segs.clone()];
                        }
                        paths_at(it, 0)
                            .into_iter()
                            .map(|tail| segs.iter().cloned().chain(tail).collect())
                            .collect()
                    })
                    .collect();
            }
            continue;
        }
        return vec![segs];
    }
}

/// Every module `module`'s code names, resolved to the deepest known module.
fn uses(module: &Module, code: &str, known: &BTreeSet<Module>) -> BTreeSet<Module> {
    let children = declared(code);
    let mut found = BTreeSet::new();
    let chars: Vec<(usize, char)> = code.char_indices().collect();
    for (n, &(at, _)) in chars.iter().enumerate() {
        let before = n.checked_sub(1).map(|p| chars[p].1);
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let rest = &code[at..];
        let (base, skip): (Module, usize) = if rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if rest.starts_with("self::") {
            (module.clone(), "self::".len())
        } else if rest.starts_with("super::") {
            let mut base = module.clone();
            let mut skip = 0;
            while code[at + skip..].starts_with("super::") {
                base.pop();
                skip += "super::".len();
            }
            (base, skip)
        } else if let Some(child) = children
            .iter()
            .find(|c| rest.starts_with(&format!("{c}::")))
        {
            let mut base = module.clone();
            base.push(child.clone());
            (base, child.len() + 2)
        } else {
            continue;
        };
        for tail in paths_at(code, at + skip) {
            let full: Module = base.iter().cloned().chain(tail).collect();
            let target = (0..=full.len())
                .rev()
                .map(|k| full[..k].to_vec())
                .find(|m| known.contains(m))
                .unwrap_or_default();
            if &target != module {
                found.insert(target);
            }
        }
    }
    found
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        next: usize,
        found: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}

fn graph_of(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: Vec<(Module, String)> = files
        .iter()
        .filter_map(|f| Some((module_of(src, f)?, std::fs::read_to_string(f).unwrap())))
        .collect();
    let known: BTreeSet<Module> = modules.iter().map(|(m, _)| m.clone()).collect();
    modules
        .iter()
        .map(|(m, text)| (m.clone(), uses(m, &code_of(text), &known)))
        .collect()
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_module_of_src_uses_one_that_uses_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph_of(&src);
    assert!(graph.len() > 20, "found only {} modules", graph.len());
    let found = cycles(&graph);
    let report: Vec<String> = found
        .iter()
        .map(|c| {
            let names: Vec<String> = c.iter().map(name).collect();
            let edges: Vec<String> = c
                .iter()
                .flat_map(|m| {
                    graph[m]
                        .iter()
                        .filter(|t| c.contains(t))
                        .map(move |t| format!("{} -> {}", name(m), name(t)))
                })
                .collect();
            format!("{{{}}}: {}", names.join(", "), edges.join("; "))
        })
        .collect();
    assert!(report.is_empty(), "import cycles:\n{}", report.join("\n"));
}

#[test]
fn the_checker_sees_every_kind_of_path_and_finds_a_cycle() {
    let m = |s: &str| -> Module {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split("::").map(String::from).collect()
        }
    };
    let known: BTreeSet<Module> = ["", "a", "a::b", "a::c", "d"]
        .iter()
        .map(|s| m(s))
        .collect();
    let code = "mod b;\nuse crate::d::{Thing, other};\nuse super::x;\nfn f() { b::go(); self::c::y(); }\n// crate::nope\n";
    let used = uses(&m("a"), &code_of(code), &known);
    let expect: BTreeSet<Module> = ["d", "", "a::b", "a::c"].iter().map(|s| m(s)).collect();
    assert_eq!(used, expect);
    let grouped = uses(&m("d"), "use crate::a::{b::X, c};", &known);
    assert_eq!(grouped, ["a::b", "a::c"].iter().map(|s| m(s)).collect());

    let mut graph = BTreeMap::new();
    graph.insert(m("a"), [m("a::b")].into());
    graph.insert(m("a::b"), [m("d")].into());
    graph.insert(m("d"), [m("a")].into());
    graph.insert(m("a::c"), [m("a")].into());
    let found = cycles(&graph);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].len(), 3);
}
