//! Multi-document YAML in and out, as JSON values.
//!
//! Read as YAML 1.2 (`yes` and `on` stay strings, `0755` and `1_000` are
//! not numbers), as the Kubernetes fields they land in expect. Written
//! with keys in order (as `kubectl get -o yaml` does) and every string
//! that a YAML reader could take for something else quoted: `"true"`,
//! `"1337"`, `"0x1F"`, `"~"` stay strings.

use serde_json::Value;

/// The documents of `text`; empty documents (only comments, or nothing
/// between two `---`) are left out.
pub fn read_documents(text: &str) -> Result<Vec<Value>, String> {
    let options = serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    };
    let documents: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| e.to_string())?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// The documents as YAML, `---` between them.
pub fn write_documents(documents: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    for (i, document) in documents.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(document).map_err(|e| e.to_string())?);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strings_that_look_like_other_things_stay_strings() {
        let tricky = [
            "true",
            "false",
            "yes",
            "no",
            "on",
            "off",
            "y",
            "n",
            "Y",
            "TRUE",
            "null",
            "Null",
            "~",
            "",
            "1337",
            "-1",
            "+1",
            "1.5",
            "1e3",
            ".5",
            "0x1F",
            "0o17",
            "0755",
            "1_000",
            ".inf",
            "-.inf",
            ".nan",
            "12:30:00",
            "2001-12-14",
            "0.0.0.0:15020",
            "100m",
            "64Mi",
            "=",
            "<<",
            "- x",
            "-",
            "---",
            "...",
            "#c",
            "a #b",
            "a: b",
            "key:",
            "*x",
            "&x",
            "!x",
            "%x",
            "@x",
            "`x",
            "{x",
            "[x",
            "}",
            "]",
            ",x",
            "?",
            "|",
            ">",
            "'",
            "\"",
            " lead",
            "trail ",
            "multi\nline\n",
            "  indented\nblock",
            "tab\tx",
            "\u{feff}bom",
            "é",
        ];
        let long = "word ".repeat(40);
        let json_text = r#"{"web":{"readiness":{"httpGet":{"path":"/healthz","port":8080}}}}"#;
        let mut strings: Vec<&str> = tricky.to_vec();
        strings.extend([long.as_str(), json_text]);
        let doc = json!({
            "strings": strings,
            "numbers": [0, 1337, -2, 1.5, 3000000000u64],
            "flags": [true, false, null],
            "empty": { "map": {}, "list": [] },
            "true": "key that looks like a bool",
        });
        let yaml = write_documents(std::slice::from_ref(&doc)).unwrap();
        assert_eq!(read_documents(&yaml).unwrap(), [doc]);
        assert!(yaml.contains("- \"1337\"\n"), "{yaml}");
        assert!(yaml.contains("- \"true\"\n"), "{yaml}");
    }

    #[test]
    fn documents_are_read_as_yaml_1_2_and_written_with_separators() {
        let docs = read_documents(
            "# header\n---\na: yes\nb: 0755\nc: 1_000\nd: 0x1F\ne: 8080\n---\n---\n# nothing\n---\nf: [1, 2]\n",
        )
        .unwrap();
        assert_eq!(
            docs,
            [
                json!({ "a": "yes", "b": "0755", "c": "1_000", "d": 31, "e": 8080 }),
                json!({ "f": [1, 2] }),
            ]
        );
        let yaml = write_documents(&docs).unwrap();
        assert_eq!(
            yaml,
            "a: \"yes\"\nb: \"0755\"\nc: \"1_000\"\nd: 31\ne: 8080\n---\nf:\n- 1\n- 2\n"
        );
        assert_eq!(write_documents(&[]).unwrap(), "");
    }

    #[test]
    fn bad_yaml_is_an_error() {
        assert!(read_documents("a: [1, 2\n").is_err());
        assert!(read_documents("a: 1\na: 2\n").is_err());
    }
}
