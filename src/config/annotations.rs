//! Resources in the `getambassador.io/config` annotation of Services and Ingresses, the way
//! Emissary reads them: each becomes a document of its own for the loader. Pure.

use serde_json::Value;

use super::diag::Diagnostic;
use super::schema;
use super::yaml::{self, Document, YamlLimits};
use super::Options;

/// The annotation Emissary reads resources from, on Services and Ingresses.
pub const CONFIG_ANNOTATION: &str = "getambassador.io/config";

/// The resources in a Service's or Ingress's `getambassador.io/config` annotation, as
/// documents of their own: they take the parent's namespace and labels unless they name their
/// own, `ambassador/vN` means `getambassador.io/vN`, and the flat annotation form (fields
/// beside `name`, no `spec`) is read as metadata plus spec. Lines count from the annotation.
pub(super) fn documents(
    parent: &Document,
    file: &str,
    opts: &Options,
    diags: &mut Vec<Diagnostic>,
) -> Vec<Document> {
    let v = &parent.value;
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default();
    if !matches!(kind, "Service" | "Ingress") {
        return Vec::new();
    }
    let Some(text) = v
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(CONFIG_ANNOTATION))
        .and_then(Value::as_str)
    else {
        return Vec::new();
    };
    let pointer = format!(
        "/metadata/annotations/{}",
        yaml::escape_pointer(CONFIG_ANNOTATION)
    );
    let at = schema::locate(parent, file, &pointer);
    let parent_name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let namespace = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or(&opts.namespace)
        .to_string();
    let labels = v.pointer("/metadata/labels").cloned();
    let docs = match yaml::parse_documents(text, YamlLimits::default()) {
        Ok(d) => d,
        Err(e) => {
            diags.push(
                Diagnostic::error(
                    "yaml",
                    &at,
                    format!("the {CONFIG_ANNOTATION} annotation of {kind} `{parent_name}` is not YAML: {e}"),
                )
                .with_help("fix the annotation's YAML; nothing in it was loaded"),
            );
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for d in docs.into_iter().flat_map(super::model::expand_lists) {
        let Value::Object(mut o) = d.value else {
            continue;
        };
        if let Some(Value::String(api)) = o.get_mut("apiVersion") {
            if let Some(rest) = api.strip_prefix("ambassador/") {
                *api = format!("getambassador.io/{rest}");
            }
        }
        if !o.contains_key("spec") {
            // The flat annotation form: `name` and the spec's fields side by side.
            let mut spec = serde_json::Map::new();
            let mut meta = serde_json::Map::new();
            for (k, val) in std::mem::take(&mut o) {
                match k.as_str() {
                    "apiVersion" | "kind" => {
                        o.insert(k, val);
                    }
                    "name" | "namespace" => {
                        meta.insert(k, val);
                    }
                    "metadata_labels" => {
                        meta.insert("labels".into(), val);
                    }
                    _ => {
                        spec.insert(k, val);
                    }
                }
            }
            o.insert("metadata".into(), Value::Object(meta));
            o.insert("spec".into(), Value::Object(spec));
        }
        if let Some(Value::Object(meta)) = o.get_mut("metadata") {
            meta.entry("namespace")
                .or_insert_with(|| Value::String(namespace.clone()));
            if let Some(l) = &labels {
                meta.entry("labels").or_insert_with(|| l.clone());
            }
        }
        let shift = |p: yaml::Pos| yaml::Pos {
            line: at.line + p.line,
            column: p.column,
        };
        let mut doc = Document {
            value: Value::Object(o),
            pos: shift(d.pos),
            positions: d
                .positions
                .into_iter()
                .map(|(k, p)| (k, shift(p)))
                .collect(),
        };
        super::model::convert_older(&mut doc);
        out.push(doc);
    }
    if !out.is_empty() {
        diags.push(Diagnostic::note(
            "annotation-resources",
            &at,
            format!(
                "{} resource(s) read from the {CONFIG_ANNOTATION} annotation of {kind} `{parent_name}` (namespace `{namespace}`)",
                out.len()
            ),
        ));
    }
    out
}
