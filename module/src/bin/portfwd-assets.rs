//! `portfwd-assets OUT_DIR`: renders what the Debian package ships beside the binary, from the
//! same clap definitions as `portfwd --help`: the man page (`portfwd.1`), bash, zsh and fish
//! completions, and the JSON Schema of the params (`schema.json`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

#[path = "../cli.rs"]
mod cli;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: portfwd-assets OUT_DIR");
        return ExitCode::from(2);
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
    let mut man = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut man)?;
    std::fs::write(out.join("portfwd.1"), man)?;
    for (shell, name) in [
        (Shell::Bash, "portfwd.bash"),
        (Shell::Zsh, "_portfwd"),
        (Shell::Fish, "portfwd.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, "portfwd", &mut script);
        std::fs::write(out.join(name), script)?;
    }
    let schema = serde_json::to_string_pretty(&portfwd::schema())?;
    std::fs::write(out.join("schema.json"), schema + "\n")
}
