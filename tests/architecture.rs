//! The layering ARCHITECTURE.md states, checked against the source: each top-level module uses
//! only modules to its left in `LAYERS`, so no cycle can creep in between them.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Top-level modules, lowest first (ARCHITECTURE.md, "How the modules depend on each other").
const LAYERS: [&str; 9] = [
    "config",
    "health",
    "state",
    "strategy",
    "snapshot",
    "dataplane",
    "control",
    "admin",
    "balancer",
];

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `text` names as `crate::<module>`, unit tests left out (they may
/// reach anywhere to set up a case).
fn uses(text: &str) -> BTreeSet<&str> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    code.match_indices("crate::")
        .filter_map(|(at, _)| {
            let rest = &code[at + "crate::".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            LAYERS.iter().copied().find(|m| *m == &rest[..end])
        })
        .collect()
}

#[test]
fn top_level_modules_only_use_modules_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a file name");
        let module = first.strip_suffix(".rs").unwrap_or(first);
        let Some(layer) = LAYERS.iter().position(|m| *m == module) else {
            continue;
        };
        // A module's own unit tests in a sibling file.
        if relative.ends_with("tests.rs") || relative.components().any(|c| c.as_os_str() == "tests")
        {
            continue;
        }
        seen.insert(module);
        let text = fs::read_to_string(file).expect("read a source file");
        for used in uses(&text) {
            let used_layer = LAYERS.iter().position(|m| *m == used).expect("a layer");
            if used_layer > layer {
                wrong.push(format!("{} uses crate::{used}", relative.display()));
            }
        }
    }
    assert_eq!(
        seen.len(),
        LAYERS.len(),
        "every layer has sources: {seen:?}"
    );
    assert!(
        wrong.is_empty(),
        "a module uses one above it (see ARCHITECTURE.md):\n{}",
        wrong.join("\n")
    );
}
