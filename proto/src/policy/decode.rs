//! The decoding helper: walks a [`Node`] tree while tracking the path from
//! the document root and collecting every problem instead of stopping at the
//! first.
//!
//! It checks shapes and scalar types (unknown and missing fields, wrong
//! types, integer ranges, durations); what a field means is decided by the
//! per-kind code in `kinds`, which calls these helpers. Every helper records
//! its own error and returns `None`, so callers decode all siblings before
//! using `?` on any of them.

use std::collections::BTreeMap;
use std::time::Duration;

use super::duration::{format_duration, parse_duration};
use super::node::{Node, SNode, line_of};

/// A problem inside one document, before it is attached to a resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub path: String,
    pub message: String,
    pub line: Option<u64>,
}

/// A node and the path that leads to it.
#[derive(Clone)]
pub(crate) struct Val<'a> {
    pub node: &'a SNode,
    pub path: String,
}

impl<'a> Val<'a> {
    pub fn root(node: &'a SNode) -> Self {
        Val {
            node,
            path: String::new(),
        }
    }

    pub fn line(&self) -> Option<u64> {
        line_of(self.node)
    }

    fn key_path(&self, key: &str) -> String {
        let simple = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        match (self.path.is_empty(), simple) {
            (true, true) => key.to_string(),
            (false, true) => format!("{}.{key}", self.path),
            (_, false) => format!("{}[{key:?}]", self.path),
        }
    }
}

/// A mapping whose keys have been checked against the allowed field names.
pub(crate) struct Obj<'a> {
    pub val: Val<'a>,
    entries: Vec<(&'a str, &'a SNode)>,
}

impl<'a> Obj<'a> {
    /// The field's value; `None` when absent or written as null, which both
    /// mean "not set".
    pub fn get(&self, key: &str) -> Option<Val<'a>> {
        self.entries
            .iter()
            .find(|(k, v)| *k == key && v.value != Node::Null)
            .map(|(k, node)| Val {
                node,
                path: self.val.key_path(k),
            })
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The path a missing field would have, for errors about it.
    pub fn path(&self, key: &str) -> String {
        self.val.key_path(key)
    }
}

/// Collects problems while decoding one document.
#[derive(Default)]
pub(crate) struct Decoder {
    pub problems: Vec<Problem>,
}

impl Decoder {
    pub fn error_at(&mut self, path: String, line: Option<u64>, message: impl Into<String>) {
        self.problems.push(Problem {
            path,
            message: message.into(),
            line,
        });
    }

    pub fn error(&mut self, at: &Val<'_>, message: impl Into<String>) {
        self.error_at(at.path.clone(), at.line(), message);
    }

    /// Records `Err` from a validator at `at`.
    pub fn check<T>(&mut self, at: &Val<'_>, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.error(at, message)).ok()
    }

    /// Reports a node of the wrong type: `expected a string, found a list`.
    pub fn type_error<T>(&mut self, at: &Val<'_>, expected: &str) -> Option<T> {
        let found = at.node.value.describe();
        self.error(at, format!("expected {expected}, found {found}"));
        None
    }

    /// A mapping with only the given keys; others are reported as unknown.
    pub fn obj<'a>(&mut self, at: &Val<'a>, fields: &[&str]) -> Option<Obj<'a>> {
        let Node::Map(map) = &at.node.value else {
            return self.type_error(at, "a mapping");
        };
        let mut entries = Vec::with_capacity(map.len());
        for (key, value) in map {
            match &key.value {
                Node::Str(k) if fields.contains(&k.as_str()) => entries.push((k.as_str(), value)),
                Node::Str(k) => {
                    let expected = fields.join(", ");
                    self.error_at(
                        at.key_path(k),
                        line_of(key),
                        format!("unknown field {k:?} (expected one of: {expected})"),
                    );
                }
                other => {
                    let message = format!("keys must be strings, found {}", other.describe());
                    self.error_at(at.path.clone(), line_of(key), message);
                }
            }
        }
        Some(Obj {
            val: at.clone(),
            entries,
        })
    }

    /// A field that must be present; reported at the mapping's line.
    pub fn required<'a>(&mut self, obj: &Obj<'a>, key: &str) -> Option<Val<'a>> {
        let found = obj.get(key);
        if found.is_none() {
            self.error_at(obj.path(key), obj.val.line(), "required");
        }
        found
    }

    /// A required field decoded by `f`.
    pub fn req<'a, T>(
        &mut self,
        obj: &Obj<'a>,
        key: &str,
        f: impl FnOnce(&mut Self, &Val<'a>) -> Option<T>,
    ) -> Option<T> {
        let v = self.required(obj, key)?;
        f(self, &v)
    }

    /// An optional field decoded by `f`: `Some(None)` when absent, `None`
    /// when present but invalid.
    pub fn opt<'a, T>(
        &mut self,
        obj: &Obj<'a>,
        key: &str,
        f: impl FnOnce(&mut Self, &Val<'a>) -> Option<T>,
    ) -> Option<Option<T>> {
        match obj.get(key) {
            None => Some(None),
            Some(v) => f(self, &v).map(Some),
        }
    }

    pub fn string(&mut self, at: &Val<'_>) -> Option<String> {
        match &at.node.value {
            Node::Str(s) => Some(s.clone()),
            _ => self.type_error(at, "a string"),
        }
    }

    /// A string checked (and possibly normalised) by `validate`.
    pub fn string_with(
        &mut self,
        at: &Val<'_>,
        validate: impl FnOnce(&str) -> Result<String, String>,
    ) -> Option<String> {
        let s = self.string(at)?;
        self.check(at, validate(&s))
    }

    /// An integer in `min..=max`.
    pub fn int(&mut self, at: &Val<'_>, min: i128, max: i128) -> Option<i128> {
        let n = match at.node.value {
            Node::Int(n) => n,
            // Integers past the 64-bit range come back as floats; report them
            // as out of range rather than as the wrong type.
            Node::Float(f) if f.fract() == 0.0 && f.abs() >= 9.0e18 => f as i128,
            _ => return self.type_error(at, "an integer"),
        };
        self.range(at, n, min, max)
    }

    pub fn u32(&mut self, at: &Val<'_>, min: u32) -> Option<u32> {
        let n = self.int(at, min.into(), u32::MAX.into())?;
        u32::try_from(n).ok()
    }

    fn range<T: PartialOrd + std::fmt::Display + Default>(
        &mut self,
        at: &Val<'_>,
        n: T,
        min: T,
        max: T,
    ) -> Option<T> {
        let message = if n < min && min == T::default() {
            "must not be negative".to_string()
        } else if n < min {
            format!("must be ≥ {min}")
        } else if n > max {
            format!("must be ≤ {max}")
        } else {
            return Some(n);
        };
        self.error(at, message);
        None
    }

    /// A percentage, written as an integer or a float, in `0..=100`.
    pub fn percent(&mut self, at: &Val<'_>) -> Option<f64> {
        let n = match at.node.value {
            Node::Int(n) => n as f64,
            Node::Float(f) => f,
            _ => return self.type_error(at, "a number"),
        };
        self.range(at, n, 0.0, 100.0)
    }

    /// A duration string; zero is refused unless `allow_zero`.
    pub fn duration(&mut self, at: &Val<'_>, allow_zero: bool) -> Option<Duration> {
        let Node::Str(s) = &at.node.value else {
            return self.type_error(at, "a duration such as \"250ms\" or \"2s\"");
        };
        let d = self.check(at, parse_duration(s))?;
        if d.is_zero() && !allow_zero {
            self.error(at, "must be greater than 0s");
            return None;
        }
        Some(d)
    }

    /// Reports a duration field (or, when absent, its default `value`) that is
    /// not `≤` (`at_most`) or `≥` the `bound` named `what`.
    pub fn duration_bound(
        &mut self,
        obj: &Obj<'_>,
        key: &str,
        value: Duration,
        bound: Duration,
        what: &str,
        at_most: bool,
    ) {
        if (at_most && value <= bound) || (!at_most && value >= bound) {
            return;
        }
        let (path, line, subject) = match obj.get(key) {
            Some(v) => (v.path.clone(), v.line(), "must be".to_string()),
            None => (
                obj.path(key),
                obj.val.line(),
                format!("defaults to {}, which must be", format_duration(value)),
            ),
        };
        let op = if at_most { "≤" } else { "≥" };
        self.error_at(
            path,
            line,
            format!("{subject} {op} {what} ({})", format_duration(bound)),
        );
    }

    pub fn list<'a>(&mut self, at: &Val<'a>) -> Option<Vec<Val<'a>>> {
        let Node::Seq(items) = &at.node.value else {
            return self.type_error(at, "a list");
        };
        let path = &at.path;
        Some(
            items
                .iter()
                .enumerate()
                .map(|(i, node)| Val {
                    node,
                    path: format!("{path}[{i}]"),
                })
                .collect(),
        )
    }

    /// Decodes every item, even after one fails; `None` if any failed.
    pub fn each<'a, T>(
        &mut self,
        at: &Val<'a>,
        mut item: impl FnMut(&mut Self, &Val<'a>) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = self.list(at)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for v in &items {
            match item(self, v) {
                Some(x) => out.push(x),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// Like [`Decoder::each`], for a list that must have at least one item.
    pub fn each_nonempty<'a, T>(
        &mut self,
        at: &Val<'a>,
        item: impl FnMut(&mut Self, &Val<'a>) -> Option<T>,
    ) -> Option<Vec<T>> {
        let out = self.each(at, item)?;
        if out.is_empty() {
            self.error(at, "must not be empty");
            return None;
        }
        Some(out)
    }

    /// One of a fixed set of strings (case-sensitive), mapped to its value.
    pub fn one_of<T: Copy>(&mut self, at: &Val<'_>, choices: &[(&str, T)]) -> Option<T> {
        let s = self.string(at)?;
        let found = choices.iter().find(|(name, _)| *name == s).map(|&(_, v)| v);
        if found.is_none() {
            let names: Vec<_> = choices.iter().map(|(n, _)| *n).collect();
            self.error(
                at,
                format!(
                    "unknown value {s:?} (expected one of: {})",
                    names.join(", ")
                ),
            );
        }
        found
    }

    /// A string-to-string mapping (labels, annotations).
    pub fn string_map(&mut self, at: &Val<'_>) -> Option<BTreeMap<String, String>> {
        let Node::Map(map) = &at.node.value else {
            return self.type_error(at, "a mapping of strings to strings");
        };
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (key, value) in map {
            let Node::Str(k) = &key.value else {
                let message = format!("keys must be strings, found {}", key.value.describe());
                self.error_at(at.path.clone(), line_of(key), message);
                ok = false;
                continue;
            };
            match self.string(&Val {
                node: value,
                path: at.key_path(k),
            }) {
                Some(v) => {
                    out.insert(k.clone(), v);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// Reports a pair of fields of which exactly one must be set; returns
    /// whether the rule holds.
    pub fn exactly_one(&mut self, obj: &Obj<'_>, a: &str, b: &str) -> bool {
        self.exactly_one_of(obj, &[a, b])
    }

    /// Reports fields of which exactly one must be set; returns whether the
    /// rule holds.
    pub fn exactly_one_of(&mut self, obj: &Obj<'_>, keys: &[&str]) -> bool {
        let set = keys.iter().filter(|k| obj.has(k)).count();
        if set == 1 {
            return true;
        }
        let names = match keys {
            [init @ .., last] if !init.is_empty() => format!("{} and {last}", init.join(", ")),
            _ => keys.join(""),
        };
        let message = if set == 0 {
            format!("one of {names} is required")
        } else {
            format!("only one of {names} may be set")
        };
        self.error(&obj.val, message);
        false
    }
}
