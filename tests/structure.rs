//! The shape of the code, checked from its source (no API server needed):
//! - every API write of the operator goes through `src/controller/writer.rs`, and every
//!   counted write kind is made there;
//! - no import loop among the files of `src/controller/`;
//! - no two product files share a name, and one public function is called `decide`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn source(p: &Path) -> String {
    std::fs::read_to_string(p).expect("read source")
}

/// The code of a file without its comments and without `#[cfg(test)]` modules.
fn code(p: &Path) -> String {
    let mut out = String::new();
    for line in source(p).lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let line = line.split("//").next().unwrap_or_default();
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Calls that write through kube's `Api` (or its event `Recorder`).
const WRITE_CALLS: [&str; 9] = [
    ".create(",
    ".patch(",
    ".patch_status(",
    ".patch_metadata(",
    ".replace(",
    ".replace_status(",
    ".delete(",
    ".delete_collection(",
    ".publish(",
];

/// Product files allowed to write without the writer, each for its reason.
const NOT_THE_OPERATORS_WRITES: [(&str, &str); 7] = [
    ("src/controller/writer.rs", "the doorway itself"),
    (
        "src/controller/chaos.rs",
        "the chaos build's create-over-existing, called only from inside the writer",
    ),
    (
        "src/controller/proof.rs",
        "the proof key's Secret, made once at start by whichever replica is first, before any term",
    ),
    (
        "src/leader.rs",
        "the leadership Lease: the election that makes the term cannot be bounded by it",
    ),
    (
        "src/telemetry/auth.rs",
        "TokenReview and SubjectAccessReview for /metrics: questions to the API server, not state",
    ),
    (
        "src/arbiter/model/",
        "the model API server and the arbiter's tests (compiled for tests only)",
    ),
    (
        "src/client/",
        "the workload side (the Rust client and kubectl-lock), not the operator",
    ),
];

fn exempt(rel: &str) -> bool {
    rel.starts_with("src/bin/")
        || NOT_THE_OPERATORS_WRITES
            .iter()
            .any(|(p, _)| rel == *p || (p.ends_with('/') && rel.starts_with(p)))
}

#[test]
fn every_api_write_of_the_operator_goes_through_the_writer() {
    let mut bypasses = Vec::new();
    for p in rust_files(&root().join("src")) {
        let rel = p
            .strip_prefix(root())
            .expect("under root")
            .to_string_lossy()
            .to_string();
        if exempt(&rel) {
            continue;
        }
        for (no, line) in code(&p).lines().enumerate() {
            for call in WRITE_CALLS {
                if line.contains(call) {
                    bypasses.push(format!("{rel}:{}: {}", no + 1, line.trim()));
                }
            }
            if line.contains("metrics.write(") {
                bypasses.push(format!("{rel}:{}: counts a write itself", no + 1));
            }
        }
    }
    assert!(
        bypasses.is_empty(),
        "writes that bypass src/controller/writer.rs:\n{}",
        bypasses.join("\n")
    );
}

/// The variants of `telemetry::WriteKind`, read from its source.
fn write_kinds() -> Vec<String> {
    let src = source(&root().join("src/telemetry.rs"));
    let start = src.find("pub enum WriteKind {").expect("WriteKind");
    let body = &src[start..src[start..].find('}').expect("end") + start];
    body.lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && l.ends_with(','))
        .map(|l| l.trim_end_matches(',').to_string())
        .collect()
}

#[test]
fn every_write_kind_is_made_by_the_writer() {
    let kinds = write_kinds();
    assert!(
        kinds.len() >= 11,
        "WriteKind lists Lease, claim, Lock and Event writes: {kinds:?}"
    );
    // The writer makes each kind, or the executor names the Lease kind it asks for.
    let writer = code(&root().join("src/controller/writer.rs"));
    let execute = code(&root().join("src/controller/execute.rs"));
    for k in &kinds {
        let named = format!("WriteKind::{k}");
        assert!(
            writer.contains(&named) || execute.contains(&named),
            "{named} is never made by the writer (a write of that kind bypasses it)"
        );
    }
}

/// Which sibling files each file of `src/controller/` refers to (`super::x`), mod.rs
/// aside (it declares them all).
fn controller_imports() -> BTreeMap<String, BTreeSet<String>> {
    let dir = root().join("src/controller");
    let files: BTreeMap<String, String> = rust_files(&dir)
        .into_iter()
        .filter(|p| p.parent() == Some(dir.as_path()))
        .map(|p| {
            let stem = p.file_stem().expect("stem").to_string_lossy().to_string();
            (stem, code(&p))
        })
        .filter(|(stem, _)| stem != "mod")
        .collect();
    let names: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(name, text)| {
            let mut deps = BTreeSet::new();
            for part in text.split("super::").skip(1) {
                let head = part.trim_start_matches('{');
                for item in head.split(['}', ';']).next().unwrap_or_default().split(',') {
                    let first = item.trim().split("::").next().unwrap_or_default().trim();
                    if names.contains(first) && first != name {
                        deps.insert(first.to_string());
                    }
                }
            }
            (name.clone(), deps)
        })
        .collect()
}

/// A cycle in `graph`, if any (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|x| x == n) {
            return Some(path[i..].to_vec());
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_controller_files_import_each_other_without_a_loop() {
    let graph = controller_imports();
    assert!(
        graph["reconcile"].contains("execute"),
        "the scan sees imports"
    );
    assert_eq!(find_cycle(&graph), None, "import loop in src/controller/");
    // The chaos hooks are called from two seams only: the writer and the reconcile
    // that runs the arbiter (run.rs reads the controls and acts on them).
    let callers: Vec<&String> = graph
        .iter()
        .filter(|(_, deps)| deps.contains("chaos"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(callers, ["reconcile", "run", "writer"], "chaos seams");
    let run = code(&root().join("src/controller/run.rs"));
    assert_eq!(
        run.matches("chaos::").count(),
        2,
        "run.rs only reads the controls (chaos::controls, chaos::Controls)"
    );
    let reconcile = code(&root().join("src/controller/reconcile.rs"));
    assert_eq!(reconcile.matches("chaos::").count(), 1, "one arbiter seam");
}

#[test]
fn a_cycle_is_found_when_there_is_one() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(find_cycle(&g).map(|c| c.len()), Some(3));
}

#[test]
fn no_two_product_files_share_a_name_and_one_public_decide() {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut decides = Vec::new();
    for p in rust_files(&root().join("src")) {
        let file = p.file_name().expect("name").to_string_lossy().to_string();
        let rel = p.strip_prefix(root()).expect("root").display().to_string();
        if !["mod.rs", "main.rs", "lib.rs"].contains(&file.as_str()) {
            seen.entry(file).or_default().push(rel.clone());
        }
        if code(&p).contains("pub fn decide(") {
            decides.push(rel);
        }
    }
    let twins: Vec<_> = seen.values().filter(|v| v.len() > 1).collect();
    assert!(twins.is_empty(), "files with one name: {twins:?}");
    assert_eq!(
        decides,
        ["src/arbiter/slots.rs"],
        "public functions named decide"
    );
}
