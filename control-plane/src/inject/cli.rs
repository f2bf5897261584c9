//! `pylon inject -f FILE|-`: every document of a YAML stream, meshed, on
//! stdout. All or nothing: when one document cannot be injected, nothing
//! is written and every problem of every document is reported.

use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::Value;

use super::yaml::{read_documents, write_documents};
use super::{DEFAULT_CONTROL_PLANE, DEFAULT_IMAGE, InjectOptions, inject};

/// `pylon inject` flags.
#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// The manifests to mesh: a YAML file (one or more documents), or `-`
    /// for stdin.
    #[arg(long, short)]
    pub file: String,
    /// The image of the injected `pylon-init` and `pylon` containers.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// The control plane's URL, as the sidecars reach it.
    #[arg(long, value_name = "URL", default_value = DEFAULT_CONTROL_PLANE)]
    pub control_plane: String,
}

pub fn run_cli(args: InjectArgs) -> ExitCode {
    match run(&args) {
        Ok(yaml) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(yaml.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pylon inject: cannot write to stdout: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(message) => {
            eprintln!("pylon inject: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The meshed YAML, or why there is none.
fn run(args: &InjectArgs) -> Result<String, String> {
    let text = read_input(&args.file)?;
    let documents = read_documents(&text).map_err(|e| format!("{}: {e}", args.file))?;
    let options = InjectOptions {
        image: args.image.clone(),
        control_plane: args.control_plane.clone(),
    };
    let mut meshed = Vec::new();
    let mut failures = Vec::new();
    for (i, document) in documents.iter().enumerate() {
        match inject(document, &options) {
            Ok(out) => meshed.push(out),
            Err(e) => failures.push(format!(
                "document {} ({}) cannot be injected:\n  {}",
                i + 1,
                describe(document),
                e.to_string().replace('\n', "\n  ")
            )),
        }
    }
    if !failures.is_empty() {
        return Err(format!("{}: {}", args.file, failures.join("\n")));
    }
    write_documents(&meshed)
}

fn read_input(file: &str) -> Result<String, String> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))
    }
}

/// `Deployment web`, `Pod web-5d8f-*` (a generated name).
fn describe(object: &Value) -> String {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let metadata = object.get("metadata");
    let text = |field: &str| metadata.and_then(|m| m.get(field)).and_then(Value::as_str);
    match (text("name"), text("generateName")) {
        (Some(name), _) => format!("{kind} {name}"),
        (None, Some(prefix)) => format!("{kind} {prefix}*"),
        (None, None) => format!("{kind} without a name"),
    }
}
