//! The error type every entry point returns: one [`PolicyError`] per problem,
//! collected into [`PolicyErrors`]. It only formats; finding problems is the
//! job of the decoder and the set checks.

use std::fmt;

/// One problem in a policy, located by resource, path and (when known) line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// `Kind/name` (see [`super::display_name`]), or `document N` (1-based)
    /// when the document's kind/name are unknown.
    pub resource: String,
    /// Dotted path with indexes from the document root:
    /// `spec.rules[0].backendRefs[1].name`; empty for whole-document errors.
    pub path: String,
    pub message: String,
    /// 1-based line of the offending YAML node when known.
    pub line: Option<u64>,
}

impl PolicyError {
    pub fn new(
        resource: impl Into<String>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        PolicyError {
            resource: resource.into(),
            path: path.into(),
            message: message.into(),
            line: None,
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.resource)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found, sorted by document order then line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Orders `(position, error)` pairs by position then line, keeping the
    /// discovery order of ties, and drops the positions. `position` is the
    /// document (or resource) index the error belongs to.
    pub(crate) fn sorted(mut errors: Vec<(usize, PolicyError)>) -> Self {
        errors.sort_by_key(|(pos, e)| (*pos, e.line.unwrap_or(0)));
        PolicyErrors(errors.into_iter().map(|(_, e)| e).collect())
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl IntoIterator for PolicyErrors {
    type Item = PolicyError;
    type IntoIter = std::vec::IntoIter<PolicyError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a PolicyErrors {
    type Item = &'a PolicyError;
    type IntoIter = std::slice::Iter<'a, PolicyError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
