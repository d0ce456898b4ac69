//! The engine's module graph holds to `docs/ARCHITECTURE.md`: every top-level module of
//! `lib/src` uses only the modules its row there allows, the allowed graph has no cycle, and
//! nothing below the crate root reaches up into it.
//!
//! An edge is a `crate::NAME` path (in a `use` or in code) outside comments, string literals and
//! `#[cfg(test)]` items; test-only modules (`testing`, `proptests`, `tests.rs` files) are left
//! out, as is `fuzzing` (the fuzz targets' entry points, above everything).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const TEST_ONLY: [&str; 3] = ["testing", "proptests", "fuzzing"];

/// `lib/src` text with comments, string and char literals blanked, so braces and paths in
/// them count for nothing.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(rest.len(), |e| e + 2);
            i += end;
            out.push(' ');
        } else if let Some(hashes) = raw_string_start(rest) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            let end = rest[body..]
                .find(&close)
                .map_or(rest.len(), |e| body + e + close.len());
            i += end;
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && is_char_literal(rest) {
            let end = rest[1..].find('\'').map_or(rest.len(), |e| e + 2);
            i += end;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `r"`, `r#"`, `br"`...: the number of `#`.
fn raw_string_start(rest: &str) -> Option<usize> {
    let rest = rest.strip_prefix('b').unwrap_or(rest);
    let rest = rest.strip_prefix('r')?;
    let hashes = rest.len() - rest.trim_start_matches('#').len();
    rest[hashes..].starts_with('"').then_some(hashes)
}

/// `'a'`, `'\n'`, `'\''` rather than a lifetime `'a`.
fn is_char_literal(rest: &str) -> bool {
    let mut chars = rest.chars().skip(1);
    match chars.next() {
        Some('\\') => true,
        Some(_) => chars.next() == Some('\''),
        None => false,
    }
}

/// Removes each `#[cfg(test)]` item: up to its `;`, or its braces.
fn without_test_items(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let open = item.find('{');
        let semi = item.find(';');
        let end = match (open, semi) {
            (_, Some(s)) if open.is_none_or(|o| s < o) => s + 1,
            (Some(o), _) => {
                let mut depth = 0;
                let mut end = item.len();
                for (k, c) in item[o..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = o + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            _ => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("lib/src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules of `lib/src`, and which of them (or `lib`, the crate root) each one
/// names.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let module_of = |path: &Path| -> String {
        let rel = path.strip_prefix(src).expect("under lib/src");
        let first = rel.components().next().expect("a file");
        let name = first.as_os_str().to_string_lossy();
        name.strip_suffix(".rs").unwrap_or(&name).to_string()
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| module_of(p))
        .filter(|m| m != "lib" && !TEST_ONLY.contains(&m.as_str()))
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for path in &files {
        let module = module_of(path);
        let is_tests_file = path.file_name().is_some_and(|n| n == "tests.rs");
        if !modules.contains(&module) || is_tests_file {
            continue;
        }
        let text = std::fs::read_to_string(path).expect("a source file");
        let code = without_test_items(&code_only(&text));
        let mut named = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let after = &code[at + "crate::".len()..];
            if after.starts_with('{') {
                let group = &after[1..after.find('}').unwrap_or(after.len())];
                named.extend(group.split(',').filter_map(first_word));
            } else {
                named.extend(first_word(after));
            }
        }
        for name in named {
            let target = if modules.contains(&name) {
                name
            } else {
                // An item of the crate root itself (`crate::Error`, a re-export).
                "lib".to_string()
            };
            if target != module {
                edges.get_mut(&module).expect("a module").insert(target);
            }
        }
    }
    edges
}

fn first_word(text: &str) -> Option<String> {
    let word: String = text
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!word.is_empty()).then_some(word)
}

/// The `| module | may use |` table between the layer markers of `docs/ARCHITECTURE.md`.
fn allowed(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    let start = doc
        .find("<!-- layers -->")
        .expect("docs/ARCHITECTURE.md has a <!-- layers --> table");
    let end = doc[start..]
        .find("<!-- /layers -->")
        .map_or(doc.len(), |e| start + e);
    let mut table = BTreeMap::new();
    for line in doc[start..end].lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        if cells.len() < 3 {
            continue;
        }
        let module = cells[1].trim().trim_matches('`');
        if module.is_empty() || module.starts_with('-') || module == "module" {
            continue;
        }
        let uses = cells[2]
            .split(',')
            .map(|u| u.trim().trim_matches('`').to_string())
            .filter(|u| !u.is_empty() && u != "(nothing)")
            .collect();
        table.insert(module.to_string(), uses);
    }
    table
}

/// A cycle in `graph`, as the modules on it, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
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

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

#[test]
fn the_modules_use_only_what_the_architecture_allows() {
    let actual = graph(&root().join("src"));
    let doc = std::fs::read_to_string(root().join("../docs/ARCHITECTURE.md"))
        .expect("docs/ARCHITECTURE.md");
    let allowed = allowed(&doc);
    let mut problems = Vec::new();
    for (module, uses) in &actual {
        let Some(may) = allowed.get(module) else {
            problems.push(format!(
                "{module}: no row in docs/ARCHITECTURE.md's layer table"
            ));
            continue;
        };
        for used in uses.difference(may) {
            problems.push(format!(
                "{module} uses {used}, which its row does not allow"
            ));
        }
    }
    for module in allowed.keys().filter(|m| !actual.contains_key(*m)) {
        problems.push(format!(
            "{module}: a row for a module lib/src does not have"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    if let Some(found) = cycle(&allowed) {
        panic!("the allowed graph has a cycle: {}", found.join(" -> "));
    }
}

#[test]
fn no_module_reaches_up_into_the_crate_root() {
    let actual = graph(&root().join("src"));
    let up: Vec<&String> = actual
        .iter()
        .filter(|(_, uses)| uses.contains("lib"))
        .map(|(m, _)| m)
        .collect();
    assert!(up.is_empty(), "these name an item of lib.rs: {up:?}");
    assert_eq!(cycle(&actual), None);
}

/// The checks above can fail: a cycle and an upward edge are found where they are.
#[test]
fn the_graph_reader_finds_edges_cycles_and_skips_tests_and_literals() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let src = dir.path();
    std::fs::create_dir(src.join("b")).expect("mkdir");
    std::fs::write(src.join("lib.rs"), "mod a; mod b; mod c; pub struct Error;").expect("write");
    std::fs::write(
        src.join("a.rs"),
        "use crate::b::X;\n// crate::c in a comment\nconst S: &str = \"crate::c { \";\n#[cfg(test)]\nmod tests { use crate::c::Y; fn f() { let _ = '{'; } }\n",
    )
    .expect("write");
    std::fs::write(src.join("b/mod.rs"), "use crate::{a, Error};\n").expect("write");
    std::fs::write(src.join("c.rs"), "pub struct Y;\n").expect("write");
    let g = graph(src);
    assert_eq!(g["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(g["b"], BTreeSet::from(["a".to_string(), "lib".to_string()]));
    assert!(g["c"].is_empty());
    let found = cycle(&g).expect("a -> b -> a");
    assert!(found.contains(&"a".to_string()) && found.contains(&"b".to_string()));
}
