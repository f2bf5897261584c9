//! Policy YAML as `pylon-control apply` decodes it (`parse_documents`, then
//! `validate_set` once merged) and as the sidecar reads a policy file or
//! cache (`parse`). Invariants: no panic; `parse` accepts exactly what
//! `parse_documents` + `validate_set` accept; what is accepted writes back
//! (`to_yaml`, the store's encoding) and reads back to the same resources,
//! one document per resource; errors stay proportionate to the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pylon_proto::policy::{self, PolicyErrors};

fn check_errors(yaml: &str, errors: &PolicyErrors) {
    assert!(!errors.is_empty(), "an Err without a problem");
    // YAML breaks lines at CRLF, CR and LF.
    let breaks = yaml.replace("\r\n", "\n").matches(['\r', '\n']).count();
    let lines = breaks as u64 + 1;
    let mut text = 0usize;
    for e in errors.iter() {
        if let Some(line) = e.line {
            assert!(line >= 1 && line <= lines, "line {line} of {lines}: {e}");
        }
        text += e.to_string().len();
    }
    // Messages quote what they refuse, so allow some amplification, not
    // an explosion.
    assert!(
        text <= 64 * (yaml.len() + 256),
        "{text} bytes of errors for {} bytes of YAML",
        yaml.len()
    );
}

fuzz_target!(|data: &[u8]| {
    let yaml = String::from_utf8_lossy(data);
    let documents = policy::parse_documents(&yaml);
    let whole = policy::parse(&yaml);
    match (&documents, &whole) {
        (Ok(rs), Ok(all)) => {
            assert_eq!(rs, all);
            assert!(policy::validate_set(rs).is_ok());
        }
        (Ok(rs), Err(e)) => {
            check_errors(&yaml, e);
            assert!(
                policy::validate_set(rs).is_err(),
                "parse refused a valid set: {e}"
            );
        }
        (Err(e), Ok(_)) => panic!("parse accepted what parse_documents refused: {e}"),
        (Err(e1), Err(e2)) => {
            check_errors(&yaml, e1);
            check_errors(&yaml, e2);
        }
    }
    let Ok(resources) = documents else { return };
    let written = policy::to_yaml(&resources);
    let again = policy::parse_documents(&written)
        .unwrap_or_else(|e| panic!("{written}\ndoes not read back: {e}"));
    assert_eq!(again, resources, "{written}\nreads back differently");
    for r in &resources {
        let one = policy::to_yaml(std::slice::from_ref(r));
        let back = policy::parse_documents(&one)
            .unwrap_or_else(|e| panic!("{one}\ndoes not read back: {e}"));
        assert_eq!(back.len(), 1, "{one}\nis not one document");
        let _ = policy::to_json(r);
    }
});
