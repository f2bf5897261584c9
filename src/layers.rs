//! The rule that keeps the modules importing one way (docs/architecture.md,
//! docs/adr/0015-layers-and-request-stacks.md): each top-level module has a
//! layer, and imports only from lower layers. A `use crate::x` (or a path
//! `crate::x::…` anywhere in code) that breaks it fails this test, naming
//! the file and the import.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every top-level module and its layer, lowest first.
const LAYERS: &[(&str, u8)] = &[
    // What the sidecar is told: bootstrap configuration, and the app's
    // probes as the injector hands them over.
    ("probes", 0),
    ("config", 1),
    // Independent foundations: certificates and TLS, pure resilience state
    // machines, name resolution.
    ("identity", 2),
    ("resilience", 2),
    ("discovery", 2),
    // Metrics, traces and logs: told plain values, importing no request path.
    ("telemetry", 3),
    // HTTP transport with no policy in it.
    ("http", 4),
    // The compiled model: routes, authorization, backends, inbound limits,
    // the store and its sources.
    ("policy", 5),
    // Listeners and the request paths, composing the rest.
    ("proxy", 6),
    // The operator's doors and the wiring.
    ("admin", 7),
    ("iptables", 7),
    ("loadgen", 7),
    ("sidecar", 8),
    ("demo", 9),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
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

/// The code of a file without its unit tests and comments.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a file's code names through `crate::`, including
/// grouped imports (`use crate::{a::X, b::Y}`).
fn imports(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first segment of each top-level item of the group, up to
            // the group's own closing brace.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth > 0 => depth -= 1,
                    ',' | '}' if depth == 0 => {
                        let name = item.trim().split("::").next().unwrap_or("").to_string();
                        if !name.is_empty() {
                            found.push(name);
                        }
                        item.clear();
                        if c == '}' {
                            break;
                        }
                    }
                    c if depth == 0 => item.push(c),
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

#[test]
fn modules_import_only_from_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some(own) = layer(&top) else {
            // lib.rs, main.rs, bin/, this file: not layered.
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for name in imports(&code(&text)) {
            if name == top || name == "self" {
                continue;
            }
            match layer(&name) {
                Some(l) if l < own => {}
                Some(l) => {
                    broken
                        .entry(rel.display().to_string())
                        .or_insert_with(Vec::new)
                        .push(format!("{name} (layer {l}, not below {top}'s {own})"));
                }
                None => panic!(
                    "{}: crate::{name} is in no layer: add it to LAYERS",
                    rel.display()
                ),
            }
        }
    }
    assert!(broken.is_empty(), "imports against the layers: {broken:#?}");
}

#[test]
fn every_module_of_the_crate_has_a_layer() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(m) = line.strip_prefix("pub mod ") {
            let m = m.trim_end_matches(';');
            assert!(layer(m).is_some(), "module {m} has no layer");
        }
    }
}

#[test]
fn the_import_reader_sees_grouped_and_inline_paths() {
    let code = code(
        "use crate::config::X;\nuse crate::{http::body::B, policy::{P, Q}};\nfn f() { crate::proxy::g(); } // crate::admin",
    );
    assert_eq!(imports(&code), ["config", "http", "policy", "proxy"]);
}
