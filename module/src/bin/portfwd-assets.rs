//! `portfwd-assets OUT_DIR`: renders what the Debian package ships beside the binary, from the
//! same definitions as `portfwd --help` and `portfwd schema`: the man pages (`portfwd.1` and
//! one `portfwd-<subcommand>.1` per subcommand, so every page the main one names exists), the
//! params reference `portfwd-params.5` (from the JSON Schema), bash, zsh and fish completions,
//! and the JSON Schema itself (`schema.json`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use roff::{bold, italic, roman, Roff};
use serde_json::Value;

#[path = "../cli.rs"]
mod cli;

const USAGE: &str = "usage: portfwd-assets OUT_DIR

Writes into OUT_DIR (created if missing): portfwd.1 and portfwd-<subcommand>.1 (man pages
from the command line definitions), portfwd-params.5 (the params, from the JSON Schema),
portfwd.bash, _portfwd and portfwd.fish (completions), and schema.json.";

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let out = match args.as_slice() {
        [flag] if flag.as_os_str() == "-h" || flag.as_os_str() == "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        [dir] if !dir.to_string_lossy().starts_with('-') => dir.clone(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match write_all(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portfwd-assets: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_all(out: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    let mut command = cli::Cli::command();
    clap_mangen::generate_to(command.clone(), out)?;
    // The main page also points at the params reference.
    let main_page = out.join("portfwd.1");
    let mut page = std::fs::read_to_string(&main_page)?;
    page.push_str(
        &Roff::new()
            .control("SH", ["SEE ALSO"])
            .text([
                bold("portfwd-params"),
                roman("(5): the params, field by field."),
            ])
            .render(),
    );
    std::fs::write(&main_page, page)?;
    for (shell, name) in [
        (Shell::Bash, "portfwd.bash"),
        (Shell::Zsh, "_portfwd"),
        (Shell::Fish, "portfwd.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, "portfwd", &mut script);
        std::fs::write(out.join(name), script)?;
    }
    let schema = portfwd::schema();
    std::fs::write(out.join("portfwd-params.5"), params_page(&schema))?;
    std::fs::write(
        out.join("schema.json"),
        serde_json::to_string_pretty(&schema)? + "\n",
    )
}

/// The sections of `portfwd-params(5)`: a title, and the schema object whose fields it lists.
const SECTIONS: [(&str, &str); 7] = [
    ("TOP-LEVEL FIELDS", ""),
    ("FORWARDS (forwards[])", "ForwardParams"),
    ("POOL BACKENDS (forwards[].backends[])", "BackendParams"),
    ("MASQUERADE ENTRIES (masquerade[])", "MasqueradeParams"),
    ("ADDRESSES (addresses[])", "AddressParams"),
    ("POLICY ROUTES (policy_routes[])", "PolicyRouteParams"),
    ("ROUTES (policy_routes[].routes[])", "RouteParams"),
];

/// `portfwd-params(5)`, rendered from the JSON Schema `portfwd schema` prints, so the page
/// cannot drift from what the binary accepts.
fn params_page(schema: &Value) -> String {
    let mut page = Roff::new();
    page.control("TH", ["PORTFWD-PARAMS", "5", "", env!("CARGO_PKG_VERSION")])
        .control("SH", ["NAME"])
        .text([roman("portfwd-params - the params of portfwd, as JSON")])
        .control("SH", ["DESCRIPTION"])
        .text([roman(
            "One JSON object is the whole desired state of one instance: what it lists exists after a run, \
             and whatever the instance has that it does not list is removed. Every field is checked before \
             anything is applied; a bad value is refused naming its field. Unknown fields are refused. \
             Field order below is alphabetical; entries of a list are applied in the order given.",
        )]);
    for (title, def) in SECTIONS {
        let object = if def.is_empty() {
            schema
        } else {
            &schema["$defs"][def]
        };
        page.control("SH", [title]);
        let required: Vec<&str> = object["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for (name, field) in object["properties"].as_object().into_iter().flatten() {
            let mut head = vec![
                bold(name.as_str()),
                roman(" ("),
                italic(type_of(schema, field)),
            ];
            if required.contains(&name.as_str()) {
                head.push(roman(", required"));
            } else if let Some(default) = field.get("default") {
                head.push(roman(format!(", default {default}")));
            }
            head.push(roman(")"));
            page.control("TP", []).text(head);
            let description = description(schema, field);
            page.text([roman(description.replace('\n', " "))]);
        }
    }
    page.control("SH", ["SEE ALSO"]).text([
        bold("portfwd"),
        roman("(1), "),
        bold("portfwd-apply"),
        roman("(1); "),
        bold("portfwd schema"),
        roman(" prints the JSON Schema."),
    ]);
    page.render()
}

/// The schema `$defs` entry a field refers to, if any.
fn referenced<'a>(schema: &'a Value, field: &'a Value) -> Option<&'a Value> {
    let name = field["$ref"].as_str()?.strip_prefix("#/$defs/")?;
    schema["$defs"].get(name)
}

fn description(schema: &Value, field: &Value) -> String {
    field["description"]
        .as_str()
        .or_else(|| referenced(schema, field)?["description"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// A short type: `string`, `"tcp" | "udp" | "both"`, `list of forwards[]`, ...
fn type_of(schema: &Value, field: &Value) -> String {
    if let Some(def) = referenced(schema, field) {
        return type_of(schema, def);
    }
    if field["x-ansible-type"] == "bool" {
        return "boolean (also yes/no, on/off, 1/0)".into();
    }
    if let Some(values) = field["enum"].as_array() {
        return values
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" | ");
    }
    let alternatives = field["oneOf"].as_array().or(field["anyOf"].as_array());
    if let Some(alternatives) = alternatives {
        if alternatives.iter().all(|a| a.get("const").is_some()) {
            let consts: Vec<String> = alternatives
                .iter()
                .map(|a| a["const"].to_string())
                .collect();
            return consts.join(" | ");
        }
        let mut kinds: Vec<String> = alternatives.iter().map(|a| type_of(schema, a)).collect();
        kinds.dedup();
        return kinds.join(" or ");
    }
    match field["type"].as_str() {
        Some("array") => {
            let items = &field["items"];
            let of = match items["$ref"]
                .as_str()
                .and_then(|r| r.strip_prefix("#/$defs/"))
            {
                Some(def) => SECTIONS.iter().find(|(_, d)| *d == def).map_or_else(
                    || def.to_string(),
                    |(title, _)| format!("objects, see {title}"),
                ),
                None => type_of(schema, items),
            };
            format!("list of {of}")
        }
        Some(kind) => kind.to_string(),
        // `["string", "null"]`: an optional field; leaving it out is the null.
        None if field["type"].is_array() => field["type"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        None if field.get("const").is_some() => field["const"].to_string(),
        None => "value".to_string(),
    }
}
