//! The spanned YAML tree the decoder walks, and reading a multi-document
//! string into it with serde-saphyr.
//!
//! This module knows YAML, not policy: it keeps every node's line, numbers
//! documents the way a reader counts them, and turns serde-saphyr errors into
//! [`PolicyError`]s. It does not interpret keys or values.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Localizer, Location, MessageFormatter, Spanned};

use super::PolicyError;

/// A YAML node with the location it was written at (for an alias, where the
/// alias is used).
pub(crate) type SNode = Spanned<Node>;

/// One YAML value, shaped like JSON. Maps keep their written order so errors
/// come out in reading order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<SNode>),
    Map(Vec<(SNode, SNode)>),
}

impl Node {
    /// How the node reads in "expected X, found Y".
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a boolean",
            Node::Int(_) => "an integer",
            Node::Float(_) => "a float",
            Node::Str(_) => "a string",
            Node::Seq(_) => "a list",
            Node::Map(_) => "a mapping",
        }
    }
}

/// The 1-based line of a node, if serde-saphyr knew it.
pub(crate) fn line_of(node: &SNode) -> Option<u64> {
    Some(node.referenced.line()).filter(|&l| l > 0)
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        i128::try_from(v)
            .map(Node::Int)
            .map_err(|_| E::custom("integer too large"))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

/// One non-empty YAML document and its 1-based number in the stream.
pub(crate) struct Document {
    pub number: usize,
    pub root: SNode,
}

/// Reads every document. Empty and null documents are skipped but still
/// counted, so `document N` matches what a reader counts. A document that
/// fails to deserialize (duplicate key, exceeded budget) is reported and the
/// rest are still read; a syntax error ends the stream.
pub(crate) fn read(yaml: &str) -> (Vec<Document>, Vec<(usize, PolicyError)>) {
    // Defaults everywhere (budgets, alias limits, duplicate keys are errors)
    // except: no source snippets in messages, and YAML 1.2 booleans so that
    // `on`, `y` or `no` stay strings.
    let options = serde_saphyr::options! { with_snippet: false, strict_booleans: true };
    let starts = document_starts(yaml);
    let number_at = |line: u64| 1 + starts.partition_point(|&s| s <= line);
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    let mut input = yaml.as_bytes();
    for item in serde_saphyr::read_with_options::<_, SNode>(&mut input, options) {
        match item {
            Ok(root) => {
                let number = line_of(&root).map_or(docs.len() + 1, number_at);
                docs.push(Document { number, root });
            }
            Err(err) => {
                let line = err.location().map(|l| l.line()).filter(|&l| l > 0);
                let number = line.map_or(docs.len() + 1, number_at);
                let error = PolicyError {
                    line,
                    ..PolicyError::new(format!("document {number}"), "", message(&err))
                };
                errors.push((number, error));
            }
        }
    }
    (docs, errors)
}

/// The user-facing wording of a serde-saphyr error, without its location
/// suffix: our own format adds the line.
fn message(err: &serde_saphyr::Error) -> String {
    struct NoLocation;
    impl Localizer for NoLocation {
        fn attach_location<'a>(&self, base: Cow<'a, str>, _: Location) -> Cow<'a, str> {
            base
        }
    }
    struct Plain;
    impl MessageFormatter for Plain {
        fn localizer(&self) -> &dyn Localizer {
            &NoLocation
        }
        fn format_message<'a>(&self, err: &'a serde_saphyr::Error) -> Cow<'a, str> {
            serde_saphyr::UserMessageFormatter.format_message(err)
        }
    }
    err.render_with_options(serde_saphyr::render_options! {
        formatter: &Plain,
        snippets: serde_saphyr::SnippetMode::Off,
    })
}

/// The first line of every document after the first, found by scanning for
/// `---` / `...` markers at column 0 (YAML forbids those inside a document, so
/// block scalars cannot hide them). serde-saphyr drops empty documents
/// without saying where they were; this restores the count.
fn document_starts(yaml: &str) -> Vec<u64> {
    let mut starts = Vec::new();
    // Whether the current document has begun: a `---` before any content
    // opens the first document rather than ending an empty one.
    let mut open = false;
    for (line, text) in (1u64..).zip(yaml_lines(yaml.trim_start_matches('\u{feff}'))) {
        let marker = |m: &str| {
            text.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if marker("---") {
            if open {
                starts.push(line);
            }
            open = true;
        } else if marker("...") {
            if open {
                starts.push(line + 1);
            }
            open = false;
        } else if !open {
            let t = text.trim_start();
            open = !(t.is_empty() || t.starts_with('#') || text.starts_with('%'));
        }
    }
    starts
}

/// The lines of `text` as YAML (and serde-saphyr's line numbers) count
/// them: a line break is CRLF, CR or LF. `str::lines` does not break at a
/// lone CR, which put every document of a CR-only file in document 1.
fn yaml_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\r', '\n']) {
            Some(i) => {
                let after = if s[i..].starts_with("\r\n") {
                    i + 2
                } else {
                    i + 1
                };
                rest = Some(&s[after..]);
                Some(&s[..i])
            }
            None => {
                rest = None;
                (!s.is_empty()).then_some(s)
            }
        }
    })
}

/// The node at a dotted path such as `spec.rules[0].backendRefs[1].name`.
pub(crate) fn find<'a>(root: &'a SNode, path: &str) -> Option<&'a SNode> {
    let mut node = root;
    for segment in path.split('.') {
        let (key, indexes) = segment
            .split_once('[')
            .map_or((segment, ""), |(k, rest)| (k, rest));
        node = match &node.value {
            Node::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(&k.value, Node::Str(s) if s == key))
                .map(|(_, v)| v)?,
            _ => return None,
        };
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            let i: usize = index.trim_end_matches(']').parse().ok()?;
            node = match &node.value {
                Node::Seq(items) => items.get(i)?,
                _ => return None,
            };
        }
    }
    Some(node)
}

/// The string at `path`, if there is one.
pub(crate) fn find_str<'a>(root: &'a SNode, path: &str) -> Option<&'a str> {
    match &find(root, path)?.value {
        Node::Str(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(yaml: &str) -> Vec<(usize, Node)> {
        let (docs, errors) = read(yaml);
        assert!(errors.is_empty(), "{errors:?}");
        docs.into_iter().map(|d| (d.number, d.root.value)).collect()
    }

    #[test]
    fn scalars_keep_their_types() {
        let docs = roots("a: [x, 2, -3, 2.5, true, ~, on, y, '5', 0x10]\n");
        let Node::Map(entries) = &docs[0].1 else {
            panic!("not a map")
        };
        let Node::Seq(items) = &entries[0].1.value else {
            panic!("not a seq")
        };
        let values: Vec<_> = items.iter().map(|i| i.value.clone()).collect();
        assert_eq!(
            values,
            [
                Node::Str("x".into()),
                Node::Int(2),
                Node::Int(-3),
                Node::Float(2.5),
                Node::Bool(true),
                Node::Null,
                Node::Str("on".into()),
                Node::Str("y".into()),
                Node::Str("5".into()),
                Node::Int(16),
            ]
        );
        assert_eq!(line_of(&items[0]), Some(1));
    }

    #[test]
    fn documents_are_numbered_as_written() {
        let yaml = "a: 1\n---\n# only a comment\n---\nb: 2\n...\n---\n---\nc: 3\n";
        let numbers: Vec<_> = roots(yaml).into_iter().map(|(n, _)| n).collect();
        assert_eq!(numbers, [1, 3, 5]);
        // A leading `---` opens the first document rather than ending one.
        let numbers: Vec<_> = roots("# header\n---\na: 1\n---\nb: 2\n")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(numbers, [1, 2]);
    }

    #[test]
    fn empty_and_comment_only_inputs_have_no_documents() {
        assert!(roots("").is_empty());
        assert!(roots("# nothing here\n\n# still nothing\n").is_empty());
        assert!(roots("---\n---\n").is_empty());
    }

    #[test]
    fn errors_carry_document_and_line() {
        let (docs, errors) = read("a: 1\n---\nb: 1\nb: 2\n---\nc: 1\n");
        assert_eq!(
            docs.len(),
            2,
            "the documents around a bad one are still read"
        );
        assert_eq!(errors.len(), 1);
        let (_, e) = &errors[0];
        assert_eq!(e.resource, "document 2");
        assert_eq!(e.line, Some(4));
        assert!(e.message.contains("duplicate"), "{}", e.message);
        assert!(
            !e.message.contains("line"),
            "location is ours to add: {}",
            e.message
        );
    }

    #[test]
    fn find_walks_paths() {
        let (docs, _) = read("spec:\n  rules:\n    - name: a\n    - name: b\n");
        let root = &docs[0].root;
        assert_eq!(find_str(root, "spec.rules[1].name"), Some("b"));
        assert_eq!(find(root, "spec.rules[1].name").and_then(line_of), Some(4));
        assert!(find(root, "spec.rules[2].name").is_none());
        assert!(find(root, "spec.nope").is_none());
    }
}
