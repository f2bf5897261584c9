//! Policy resources: reading multi-document YAML into the validated model
//! ([`parse`]), checking a set for consistency ([`validate_set`]) and writing
//! it back ([`to_yaml`], [`to_json`]).
//!
//! Decoding reports every problem at once, each with its resource, path and
//! line. Nothing here applies policy to traffic; the sidecar compiles the
//! model, the control plane stores it.

mod decode;
mod duration;
mod error;
mod kinds;
pub mod model;
mod node;
mod validate;
mod write;

pub use duration::{format_duration, parse_duration};
pub use error::{PolicyError, PolicyErrors};
pub use model::*;
pub use write::{to_json, to_yaml};

/// Parses a multi-document YAML string (documents separated by `---`;
/// empty documents skipped; an empty string is an empty policy), decoding and
/// validating every document and checking cross-resource rules over the
/// whole set. All-or-nothing: on any problem, every problem found.
pub fn parse(yaml: &str) -> Result<Vec<Resource>, PolicyErrors> {
    read(yaml, true)
}

/// [`parse`] without the cross-resource checks, for a batch that will be
/// merged with other resources before [`validate_set`] runs.
pub fn parse_documents(yaml: &str) -> Result<Vec<Resource>, PolicyErrors> {
    read(yaml, false)
}

/// Cross-resource checks over a complete set: no two resources with the same
/// kind, namespace and name; every backendRef names an existing Backend (in
/// its namespace, else the route's); every BackendTrafficPolicy target of
/// kind Backend exists; no Backend is targeted by two BackendTrafficPolicies
/// (reported on the second, naming the first). Errors carry no line numbers.
pub fn validate_set(resources: &[Resource]) -> Result<(), PolicyErrors> {
    let problems = validate::check_set(resources);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors::sorted(problems))
    }
}

fn read(yaml: &str, cross: bool) -> Result<Vec<Resource>, PolicyErrors> {
    let (docs, mut errors) = node::read(yaml);
    let mut resources = Vec::with_capacity(docs.len());
    for doc in &docs {
        match kinds::document(&doc.root, doc.number) {
            Ok(r) => resources.push(r),
            Err(es) => errors.extend(es.into_iter().map(|e| (doc.number, e))),
        }
    }
    // Set checks on a partial set would report references to resources that
    // failed to decode, so only references are checked then, from the raw
    // documents (see `raw_reference_problems`).
    if cross && !errors.is_empty() {
        errors.extend(raw_reference_problems(&docs));
    }
    if cross && errors.is_empty() {
        // Every document decoded, so resources and documents line up.
        for (i, mut e) in validate::check_set(&resources) {
            let Some(doc) = docs.get(i) else { continue };
            // The model folds `targetRef` into `targetRefs`; point at what
            // the document actually says.
            if node::find(&doc.root, &e.path).is_none() && e.path.starts_with("spec.targetRefs[0]")
            {
                e.path = e.path.replacen("spec.targetRefs[0]", "spec.targetRef", 1);
            }
            e.line = node::find(&doc.root, &e.path).and_then(node::line_of);
            errors.push((doc.number, e));
        }
    }
    if errors.is_empty() {
        Ok(resources)
    } else {
        Err(PolicyErrors::sorted(errors))
    }
}

/// Dangling backendRefs, read from the raw documents so that a route with
/// other problems, or a set where some document failed to decode, still gets
/// them reported. A Backend that failed to decode still counts as defined
/// when its name can be read; when some document's kind or Backend name
/// cannot be read at all, nothing is reported (it might be the missing one).
fn raw_reference_problems(docs: &[node::Document]) -> Vec<(usize, PolicyError)> {
    fn namespace_of(root: &node::SNode) -> &str {
        node::find_str(root, "metadata.namespace").unwrap_or(DEFAULT_NAMESPACE)
    }
    let mut backends = std::collections::HashSet::new();
    for doc in docs {
        match (
            node::find_str(&doc.root, "kind"),
            node::find_str(&doc.root, "metadata.name"),
        ) {
            (Some("Backend"), Some(name)) => {
                backends.insert((namespace_of(&doc.root), name));
            }
            (Some("Backend") | None, _) => return Vec::new(),
            _ => {}
        }
    }
    let mut problems = Vec::new();
    for doc in docs {
        let kind = match node::find_str(&doc.root, "kind") {
            Some("GRPCRoute") => Kind::GrpcRoute,
            Some("HTTPRoute") => Kind::HttpRoute,
            _ => continue,
        };
        let Some(name) = node::find_str(&doc.root, "metadata.name") else {
            continue;
        };
        let ns = namespace_of(&doc.root);
        for i in 0.. {
            if node::find(&doc.root, &format!("spec.rules[{i}]")).is_none() {
                break;
            }
            for j in 0.. {
                let path = format!("spec.rules[{i}].backendRefs[{j}]");
                if node::find(&doc.root, &path).is_none() {
                    break;
                }
                let name_path = format!("{path}.name");
                let Some(target) = node::find_str(&doc.root, &name_path) else {
                    continue;
                };
                let target_ns =
                    node::find_str(&doc.root, &format!("{path}.namespace")).unwrap_or(ns);
                if backends.contains(&(target_ns, target)) {
                    continue;
                }
                let where_ = if target_ns == ns {
                    String::new()
                } else {
                    format!(" in namespace {target_ns:?}")
                };
                let mut e = PolicyError::new(
                    display_name(kind, ns, name),
                    name_path.clone(),
                    format!("no Backend {target:?}{where_}"),
                );
                e.line = node::find(&doc.root, &name_path).and_then(node::line_of);
                problems.push((doc.number, e));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests;
