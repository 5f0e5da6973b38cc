//! The module structure docs/architecture.md promises, checked on the source: which top-level
//! module may import which (no cycles), and the few file-level rules inside modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules it may import (docs/architecture.md).
const ALLOWED: &[(&str, &[&str])] = &[
    ("storage", &[]),
    ("rng", &[]),
    ("dist", &[]),
    ("patch", &[]),
    ("model", &["rng"]),
    ("state", &["storage"]),
    ("source", &["patch", "storage"]),
    ("synth", &["rng", "source", "storage"]),
    (
        "train",
        &["dist", "model", "patch", "rng", "source", "state"],
    ),
    ("sink", &["model", "source", "train"]),
    ("sql", &["patch", "source", "state", "storage"]),
    (
        "pipeline",
        &[
            "dist", "model", "patch", "rng", "sink", "source", "sql", "state", "storage", "synth",
            "train",
        ],
    ),
    // Command-line only (the `cli` feature).
    (
        "bench",
        &[
            "dist", "model", "patch", "pipeline", "rng", "sink", "source", "sql", "state",
            "storage", "synth", "train",
        ],
    ),
    ("testkit", &["storage"]),
];

/// Every `crate::NAME` a file mentions outside comments.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
        // `use crate::{a::X, b}`: the names at the top of the braces.
        if let Some(at) = code.find("crate::{") {
            let inner = &code[at + "crate::{".len()..];
            for part in inner.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != "self" {
                    out.insert(name);
                }
            }
        }
    }
    out
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

/// Top-level module -> the top-level modules its files import.
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        // The library root and the binary (main.rs and its cli/ modules) may use anything.
        if matches!(top.as_str(), "lib" | "main" | "cli") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let entry = graph.entry(top.clone()).or_default();
        entry.extend(crate_imports(&text).into_iter().filter(|m| *m != top));
    }
    graph
}

#[test]
fn top_level_modules_import_only_what_the_architecture_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    let graph = import_graph(&src);
    let mut wrong = Vec::new();
    for (module, imports) in &graph {
        let Some(ok) = allowed.get(module.as_str()) else {
            wrong.push(format!(
                "module '{module}' is not in docs/architecture.md's table"
            ));
            continue;
        };
        for import in imports {
            if !ok.contains(import.as_str()) {
                wrong.push(format!("{module} imports {import}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports the architecture does not allow (docs/architecture.md):\n{}",
        wrong.join("\n")
    );
    // The table itself has no cycle: each module only imports modules listed before it.
    let order: Vec<&str> = ALLOWED.iter().map(|(m, _)| *m).collect();
    for (i, (module, deps)) in ALLOWED.iter().enumerate() {
        for dep in *deps {
            let at = order.iter().position(|m| m == dep).unwrap();
            assert!(at < i, "{module} may import {dep}, which comes after it");
        }
    }
}

#[test]
fn the_import_check_sees_plain_and_braced_imports_and_skips_comments() {
    let text = "use crate::storage::Location;\n// crate::pipeline is only mentioned\nuse crate::{model::Model, rng};\nlet x = crate::train::f();\n";
    let found: Vec<String> = crate_imports(text).into_iter().collect();
    assert_eq!(found, ["model", "rng", "storage", "train"]);
}

#[test]
fn grid_geometry_and_the_patch_batch_code_do_not_import_each_other() {
    let patch = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/patch");
    let grid = std::fs::read_to_string(patch.join("grid.rs")).unwrap();
    for other in ["encode", "assemble", "raster", "schema", "stats"] {
        assert!(
            !grid.contains(&format!("super::{other}")),
            "patch/grid.rs imports patch/{other}.rs"
        );
    }
}
