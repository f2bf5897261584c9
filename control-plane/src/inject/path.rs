//! Where a problem is, written the way `kubectl explain` and the API
//! server's own errors write it: `spec.containers[1].readinessProbe`,
//! `metadata.annotations["pylon.dev/proxy-cpu"]`.

use std::fmt;

/// A path into a Kubernetes object; the empty path is the object itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(String);

impl FieldPath {
    /// The object itself.
    pub fn root() -> FieldPath {
        FieldPath::default()
    }

    /// A field: `spec`, `spec.template`.
    pub fn field(&self, name: &str) -> FieldPath {
        if self.0.is_empty() {
            FieldPath(name.to_string())
        } else {
            FieldPath(format!("{}.{name}", self.0))
        }
    }

    /// An item of a list: `containers[0]`.
    pub fn index(&self, i: usize) -> FieldPath {
        FieldPath(format!("{}[{i}]", self.0))
    }

    /// An entry of a map: `annotations["pylon.dev/inject"]`.
    pub fn key(&self, key: &str) -> FieldPath {
        FieldPath(format!("{}[{key:?}]", self.0))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "(object)"
        } else {
            &self.0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_like_the_api_servers() {
        let p = FieldPath::root()
            .field("metadata")
            .field("annotations")
            .key("pylon.dev/proxy-cpu");
        assert_eq!(
            p.to_string(),
            r#"metadata.annotations["pylon.dev/proxy-cpu"]"#
        );
        let c = FieldPath::root().field("spec").field("containers").index(2);
        assert_eq!(c.to_string(), "spec.containers[2]");
        assert_eq!(FieldPath::root().to_string(), "(object)");
    }
}
