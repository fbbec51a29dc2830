//! The crate's structure, checked from its sources: the module graph has no import cycles
//! (none are allowed in `TANGLE_ALLOWED`) and every import points down the layers of
//! ARCHITECTURE.md; the scheduler's decisions do no I/O; only the recorder reports releases;
//! the binary holds no SQL.
//!
//! Value types (ids, candidates, outcomes, history rows, blocked reasons) live in `model` at
//! the bottom, and the store, hints, status and the scheduler's pure view import them from
//! there; this test keeps it so. It reads `src/**/*.rs`, takes every `crate::…` path (in `use`
//! items, grouped imports and inline paths) and every `super::…` path outside `#[cfg(test)]`
//! modules, maps each to the module it names, and fails with the cycle when one runs through a
//! module outside the allowed tangle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules allowed to import each other in a cycle: none. A new cycle fails this test.
const TANGLE_ALLOWED: &[&str] = &[];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
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

/// `src/scheduler/view.rs` → `scheduler::view`; `src/scheduler/mod.rs` → `scheduler`;
/// `src/lib.rs` → `` (the crate root).
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src_dir()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// The source without comments and string literals, and without `#[cfg(test)]` items (a test
/// module may import anything), so that doc links and messages are not taken for imports.
fn code_of(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut skip_depth: Option<usize> = None;
    let mut depth = 0usize;
    let mut pending_cfg_test = false;
    for line in source.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if skip_depth.is_none() && trimmed.starts_with("#[cfg(test)]") {
            pending_cfg_test = true;
            continue;
        }
        let mut code = String::new();
        let mut in_str = false;
        let mut prev = '\0';
        for c in line.chars() {
            if in_str {
                if c == '"' && prev != '\\' {
                    in_str = false;
                }
            } else if c == '"' {
                in_str = true;
            } else if c == '/' && prev == '/' {
                code.pop();
                break;
            } else {
                code.push(c);
            }
            prev = if prev == '\\' && c == '\\' { '\0' } else { c };
        }
        if pending_cfg_test && skip_depth.is_none() {
            skip_depth = Some(depth);
            pending_cfg_test = false;
        }
        for c in code.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        match skip_depth {
            Some(d) if depth <= d && (code.contains('}') || code.trim_end().ends_with(';')) => {
                skip_depth = None;
            }
            Some(_) => {}
            None => {
                out.push_str(&code);
                out.push('\n');
            }
        }
    }
    out
}

/// Every path that starts at `crate::` or `super::`, with grouped imports
/// (`crate::{a::B, c}`) expanded, as absolute segment lists.
fn paths_in(code: &str, module: &str, is_mod_rs: bool) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let boundary = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        let base: Option<(Vec<String>, usize)> = if boundary && rest.starts_with("crate::") {
            Some((Vec::new(), 7))
        } else if boundary && rest.starts_with("super::") {
            let mut segs: Vec<String> = module.split("::").map(str::to_owned).collect();
            // `super` in `a/mod.rs` (module `a`) is the parent of `a`; in `a/b.rs` too.
            let _ = is_mod_rs;
            segs.pop();
            Some((segs.into_iter().filter(|s| !s.is_empty()).collect(), 7))
        } else {
            None
        };
        let Some((prefix, skip)) = base else {
            i += 1;
            continue;
        };
        i += skip;
        let (tree, used) = read_tree(&bytes[i..]);
        i += used;
        for p in tree {
            let mut full = prefix.clone();
            full.extend(p);
            found.push(full);
        }
    }
    found
}

/// Reads a use-tree at the start of `s` (`a::b`, `a::{b, c::d}`, `{a, b}`); returns its paths
/// and the characters consumed.
fn read_tree(s: &[char]) -> (Vec<Vec<String>>, usize) {
    let mut i = 0;
    let mut segs: Vec<String> = Vec::new();
    loop {
        while i < s.len() && s[i].is_whitespace() {
            i += 1;
        }
        if i < s.len() && s[i] == '{' {
            i += 1;
            let mut out = Vec::new();
            loop {
                while i < s.len() && (s[i].is_whitespace() || s[i] == ',') {
                    i += 1;
                }
                if i >= s.len() || s[i] == '}' {
                    i += 1;
                    break;
                }
                let (sub, used) = read_tree(&s[i..]);
                i += used.max(1);
                for p in sub {
                    let mut full = segs.clone();
                    full.extend(p);
                    out.push(full);
                }
            }
            return (out, i);
        }
        let start = i;
        while i < s.len() && (s[i].is_alphanumeric() || s[i] == '_') {
            i += 1;
        }
        if i == start {
            return (vec![segs], i);
        }
        segs.push(s[start..i].iter().collect());
        if i + 1 < s.len() && s[i] == ':' && s[i + 1] == ':' {
            i += 2;
        } else {
            return (vec![segs], i);
        }
    }
}

/// The module graph: module → modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let targets = edges.entry(module.clone()).or_default();
        // A module reaches its own submodules by relative paths (`view::View`); count those as
        // edges too, so that a child importing back up to its parent is a cycle.
        for child in &modules {
            if child
                .rsplit_once("::")
                .map_or(!child.is_empty() && module.is_empty(), |(p, _)| p == module)
            {
                targets.insert(child.clone());
            }
        }
        for path in paths_in(&code, &module, is_mod_rs) {
            // The longest prefix of the path that is a module is what it names.
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|m| modules.contains(m));
            if let Some(target) = target
                && target != module
                && !module.starts_with(&format!("{target}::"))
            {
                targets.insert(target);
            }
        }
    }
    edges
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(st: &mut State<'a>, v: &'a str) {
        st.index.insert(v, st.next);
        st.low.insert(v, st.next);
        st.next += 1;
        st.stack.push(v);
        st.on_stack.insert(v);
        let g = st.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !st.index.contains_key(w) {
                visit(st, w);
                let low = st.low[v].min(st.low[w]);
                st.low.insert(v, low);
            } else if st.on_stack.contains(w) {
                let low = st.low[v].min(st.index[w]);
                st.low.insert(v, low);
            }
        }
        if st.low[v] == st.index[v] {
            let mut scc = BTreeSet::new();
            while let Some(w) = st.stack.pop() {
                st.on_stack.remove(w);
                scc.insert(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                st.out.push(scc);
            }
        }
    }
    let mut st = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !st.index.contains_key(v.as_str()) {
            visit(&mut st, v);
        }
    }
    st.out
}

/// One concrete cycle through `from` inside `scc`, for the failure message.
fn cycle_through(
    g: &BTreeMap<String, BTreeSet<String>>,
    scc: &BTreeSet<String>,
    from: &str,
) -> String {
    // Breadth-first from `from` back to itself, staying inside the component.
    let mut prev: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from.to_owned()]);
    while let Some(v) = queue.pop_front() {
        for w in g.get(&v).into_iter().flatten() {
            if !scc.contains(w) {
                continue;
            }
            if w == from {
                let mut path = vec![from.to_owned(), v.clone()];
                let mut cur = v.clone();
                while let Some(p) = prev.get(&cur) {
                    path.push(p.clone());
                    cur = p.clone();
                }
                path.reverse();
                return path.join(" → ");
            }
            if !prev.contains_key(w) && w != from {
                prev.insert(w.clone(), v.clone());
                queue.push_back(w.clone());
            }
        }
    }
    from.to_owned()
}

#[test]
fn no_import_cycles_outside_the_allowed_tangle() {
    let g = graph();
    // The parser must see the crate: a graph without the store's edges would pass vacuously.
    assert!(
        g.get("store::task").is_some_and(|t| t.contains("model")),
        "the module graph misses store::task → model: {g:?}"
    );
    let mut failures = Vec::new();
    for scc in cycles(&g) {
        if let Some(outside) = scc.iter().find(|m| !TANGLE_ALLOWED.contains(&m.as_str())) {
            failures.push(format!(
                "import cycle through {outside}: {}",
                cycle_through(&g, &scc, outside)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    // A two-module cycle and a grouped import, to show the parser and the search work.
    let code_a =
        code_of("use crate::{b::Thing, c};\n// use crate::d;\nfn f() { crate::c::g(); }\n");
    let paths = paths_in(&code_a, "a", false);
    assert_eq!(
        paths,
        vec![
            vec!["b".to_owned(), "Thing".to_owned()],
            vec!["c".to_owned()],
            vec!["c".to_owned(), "g".to_owned()],
        ]
    );
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    let found = cycles(&g);
    assert_eq!(found.len(), 1);
    assert_eq!(cycle_through(&g, &found[0], "a"), "a → b → c → a");
}

/// The crate's layers, bottom to top (ARCHITECTURE.md, "Layers of `harmonytask`"): a module
/// may import modules of its own layer or below, never above. Submodules of the store count
/// as the store.
const LAYERS: &[&[&str]] = &[
    // 1. Value types and rules.
    &[
        "resources",
        "clock",
        "backoff",
        "metrics",
        "graph",
        "model",
        "error",
        "hint",
        "status",
        "config",
        "name",
        "lifecycle",
    ],
    // 2. The store.
    &["store"],
    // 3. The scheduler's pure parts.
    &[
        "scheduler::view",
        "scheduler::admission",
        "scheduler::state",
    ],
    // 4. Handles on shared state.
    &["ownership", "scheduler::inbox"],
    // 5. Posting work and declarations.
    &["client", "follow", "singleton"],
    // 6. The programming model and the registry.
    &["task", "registry"],
    // 7. Loops.
    &[
        "retention",
        "notify",
        "machine",
        "follower",
        "recorder",
        "runner",
        "reporter",
    ],
    // 8. The scheduler driver.
    &["scheduler"],
    // 9. Assembly and the operator API.
    &["engine", "admin", "why", "simulation", ""],
];

fn layer_of(module: &str) -> Option<usize> {
    let module = if module.starts_with("store::") {
        "store"
    } else {
        module
    };
    LAYERS.iter().position(|l| l.contains(&module))
}

#[test]
fn every_import_points_down_the_layers() {
    let g = graph();
    let mut failures = Vec::new();
    for (from, targets) in &g {
        let Some(lf) = layer_of(from) else {
            failures.push(format!("module {from} is in no layer: add it to LAYERS"));
            continue;
        };
        for to in targets {
            // A parent reaches its own submodules (`scheduler` → `scheduler::state`).
            if to.starts_with(&format!("{from}::")) || from.is_empty() {
                continue;
            }
            match layer_of(to) {
                Some(lt) if lt <= lf => {}
                Some(lt) => failures.push(format!(
                    "{from} (layer {}) imports {to} (layer {}), which is above it",
                    lf + 1,
                    lt + 1
                )),
                None => failures.push(format!("module {to} is in no layer: add it to LAYERS")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The non-test code of a source file.
fn code_of_file(rel: &str) -> String {
    code_of(&std::fs::read_to_string(src_dir().join(rel)).unwrap())
}

#[test]
fn the_scheduler_decides_without_io() {
    // Time and randomness come in as arguments; no database, runtime, clock or spawn.
    for file in [
        "scheduler/state.rs",
        "scheduler/admission.rs",
        "scheduler/view.rs",
    ] {
        let code = code_of_file(file);
        for banned in [
            "Instant::now",
            "SystemTime",
            "SystemClock",
            "crate::store",
            "harmonydb::Db",
            "tokio::spawn",
            "tokio::sync",
            "tokio::time::sleep",
            "fastrand::u",
            "fastrand::usize",
            ".await",
        ] {
            assert!(
                !code.contains(banned),
                "{file} uses {banned}: the scheduler's decisions must not do I/O"
            );
        }
    }
}

#[test]
fn only_the_recorder_tells_the_scheduler_what_was_released() {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    for f in files {
        let rel = f
            .strip_prefix(src_dir())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if ["recorder.rs", "scheduler/state.rs", "simulation.rs"].contains(&rel.as_str()) {
            continue;
        }
        let code = code_of_file(&rel);
        assert!(
            !code.contains("Event::Released"),
            "{rel} sends Event::Released: only the recorder, which knows what its commit \
             applied, may"
        );
    }
}

#[test]
fn the_binary_contains_no_sql() {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../harmony/src");
    let mut files = Vec::new();
    rust_files(&bin, &mut files);
    assert!(!files.is_empty(), "no sources under {}", bin.display());
    for f in files {
        // SQL sits in string literals, which `code_of` strips: read the source with only its
        // test modules (which may check rows directly) and comments removed.
        let raw = std::fs::read_to_string(&f).unwrap();
        for line in strip_test_modules(&raw).lines() {
            for kw in [
                "SELECT ",
                "INSERT INTO",
                "DELETE FROM",
                "UPDATE harmony",
                "CREATE TABLE",
            ] {
                assert!(
                    !line.contains(kw),
                    "{} has SQL ({kw}): {line}; SQL belongs in harmonytask's store or harmonydb",
                    f.display()
                );
            }
        }
    }
}

/// The source with `#[cfg(test)]` modules removed, string literals kept.
fn strip_test_modules(source: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    let mut depth = 0i64;
    let mut pending = false;
    for line in source.lines() {
        let t = line.trim_start();
        if !skipping && t.starts_with("#[cfg(test)]") {
            pending = true;
            continue;
        }
        if pending {
            pending = false;
            skipping = true;
            depth = 0;
        }
        if skipping {
            depth += line.matches('{').count() as i64 - line.matches('}').count() as i64;
            if depth <= 0 && (line.contains('}') || line.trim_end().ends_with(';')) {
                skipping = false;
            }
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
