//! The one place that knows about the YAML parser.
//!
//! `parse_documents` turns a file's text into JSON values plus a position index (JSON pointer ->
//! line/column), so every later stage speaks JSON and can still name a line. It expands aliases
//! under a node budget (no "billion laughs"), limits nesting depth, rejects duplicate keys and
//! resolves plain scalars with the YAML 1.2 core schema. Nothing else in Legate imports the
//! parser, so it can be swapped here alone.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde_json::{Map, Number, Value};

/// A position in a file: 1-based line and column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// One parsed YAML document.
#[derive(Debug, Clone)]
pub struct Document {
    pub value: Value,
    /// Where the document starts.
    pub pos: Pos,
    /// JSON pointer ("" for the root, "/spec/prefix", "/items/0") -> position of the key (for
    /// mapping entries) or of the node (for sequence items and the root).
    pub positions: HashMap<String, Pos>,
}

impl Document {
    /// The position of `pointer`, or of its nearest ancestor that has one.
    pub fn pos_of(&self, pointer: &str) -> Pos {
        let mut p = pointer;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return self.pos,
            }
        }
    }
}

/// Why a file could not be read as YAML.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

/// Bounds that keep a hostile file from using unbounded time or memory.
#[derive(Debug, Clone, Copy)]
pub struct YamlLimits {
    /// Nodes a file may expand to, aliases included.
    pub max_nodes: usize,
    /// Nesting depth of mappings and sequences.
    pub max_depth: usize,
}

impl Default for YamlLimits {
    fn default() -> Self {
        YamlLimits {
            max_nodes: 1_000_000,
            max_depth: 64,
        }
    }
}

fn pos_from(span: &Span) -> Pos {
    Pos {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

/// Escape one JSON pointer segment (RFC 6901).
pub fn escape_pointer(seg: &str) -> String {
    if seg.contains(['~', '/']) {
        seg.replace('~', "~0").replace('/', "~1")
    } else {
        seg.to_string()
    }
}

enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
        pointer: String,
    },
    Map {
        map: Map<String, Value>,
        anchor: usize,
        pointer: String,
        pending_key: Option<(String, Pos)>,
        merges: Vec<Value>,
    },
}

struct Anchored {
    value: Value,
    nodes: usize,
}

/// Parse every document of `text`. Empty documents are returned as `Value::Null`.
pub fn parse_documents(text: &str, limits: YamlLimits) -> Result<Vec<Document>, YamlError> {
    let mut docs = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Anchored> = HashMap::new();
    let mut positions: HashMap<String, Pos> = HashMap::new();
    // Node count of each open collection, so an anchored collection knows its own size.
    let mut node_marks: Vec<usize> = Vec::new();
    let mut nodes = 0usize;
    let mut doc_pos = Pos::default();
    let mut root: Option<Value> = None;

    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| YamlError {
            pos: Pos {
                line: e.marker().line(),
                column: e.marker().col() + 1,
            },
            message: if e.info().contains("recursion limit") {
                "document nests deeper than the parser allows; flatten it".to_string()
            } else {
                format!("YAML syntax error: {}", e.info())
            },
        })?;
        let pos = pos_from(&span);
        let node = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing => continue,
            Event::DocumentStart(_) => {
                doc_pos = pos;
                root = None;
                positions = HashMap::new();
                anchors.clear();
                continue;
            }
            Event::DocumentEnd => {
                docs.push(Document {
                    value: root.take().unwrap_or(Value::Null),
                    pos: doc_pos,
                    positions: std::mem::take(&mut positions),
                });
                continue;
            }
            Event::Alias(id) => {
                let Some(a) = anchors.get(&id) else {
                    return Err(YamlError {
                        pos,
                        message: "alias refers to an unknown anchor".into(),
                    });
                };
                nodes = nodes.saturating_add(a.nodes);
                if nodes > limits.max_nodes {
                    return Err(too_many_nodes(pos, limits));
                }
                a.value.clone()
            }
            Event::Scalar(text, style, anchor, tag) => {
                nodes += 1;
                if nodes > limits.max_nodes {
                    return Err(too_many_nodes(pos, limits));
                }
                let tag = tag.map(|t| format!("{}{}", t.handle, t.suffix));
                let v = resolve_scalar(&text, style, tag.as_deref());
                if anchor > 0 {
                    anchors.insert(
                        anchor,
                        Anchored {
                            value: v.clone(),
                            nodes: 1,
                        },
                    );
                }
                v
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                nodes += 1;
                if stack.len() >= limits.max_depth {
                    return Err(YamlError {
                        pos,
                        message: format!(
                            "document nests deeper than {} levels; flatten it",
                            limits.max_depth
                        ),
                    });
                }
                let pointer = child_pointer(&stack, &mut positions, pos);
                node_marks.push(nodes);
                if matches!(event, Event::SequenceStart(..)) {
                    stack.push(Frame::Seq {
                        items: Vec::new(),
                        anchor,
                        pointer,
                    });
                } else {
                    stack.push(Frame::Map {
                        map: Map::new(),
                        anchor,
                        pointer,
                        pending_key: None,
                        merges: Vec::new(),
                    });
                }
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let start_nodes = node_marks.pop().unwrap_or(nodes);
                let (value, anchor) = match stack.pop() {
                    Some(Frame::Seq { items, anchor, .. }) => (Value::Array(items), anchor),
                    Some(Frame::Map {
                        mut map,
                        anchor,
                        merges,
                        ..
                    }) => {
                        // YAML merge keys: explicit keys win over merged ones.
                        for m in merges {
                            let sources = match m {
                                Value::Array(a) => a,
                                other => vec![other],
                            };
                            for src in sources {
                                if let Value::Object(src) = src {
                                    for (k, v) in src {
                                        map.entry(k).or_insert(v);
                                    }
                                }
                            }
                        }
                        (Value::Object(map), anchor)
                    }
                    None => continue,
                };
                if anchor > 0 {
                    anchors.insert(
                        anchor,
                        Anchored {
                            value: value.clone(),
                            nodes: nodes - start_nodes + 1,
                        },
                    );
                }
                value
            }
        };
        // A finished node: attach it to its parent.
        if let Some(Frame::Map { .. }) = stack.last() {
            // Position bookkeeping for scalars/aliases used as values happens in attach.
        }
        attach(&mut stack, &mut positions, &mut root, node, pos)?;
    }
    Ok(docs)
}

fn too_many_nodes(pos: Pos, limits: YamlLimits) -> YamlError {
    YamlError {
        pos,
        message: format!(
            "the file expands to more than {} YAML nodes (an alias bomb?); remove the repeated aliases",
            limits.max_nodes
        ),
    }
}

/// The pointer a new collection will have, recording its position (sequence items) or
/// leaving the position of the key that names it (mapping values).
fn child_pointer(stack: &[Frame], positions: &mut HashMap<String, Pos>, pos: Pos) -> String {
    match stack.last() {
        None => {
            positions.insert(String::new(), pos);
            String::new()
        }
        Some(Frame::Seq { items, pointer, .. }) => {
            let p = format!("{pointer}/{}", items.len());
            positions.insert(p.clone(), pos);
            p
        }
        Some(Frame::Map {
            pointer,
            pending_key,
            ..
        }) => match pending_key {
            Some((k, _)) => format!("{pointer}/{}", escape_pointer(k)),
            // A collection used as a key: it is rejected in attach; the pointer is unused.
            None => format!("{pointer}/?"),
        },
    }
}

fn attach(
    stack: &mut [Frame],
    positions: &mut HashMap<String, Pos>,
    root: &mut Option<Value>,
    node: Value,
    pos: Pos,
) -> Result<(), YamlError> {
    match stack.last_mut() {
        None => *root = Some(node),
        Some(Frame::Seq { items, pointer, .. }) => {
            positions
                .entry(format!("{pointer}/{}", items.len()))
                .or_insert(pos);
            items.push(node);
        }
        Some(Frame::Map {
            map,
            pointer,
            pending_key,
            merges,
            ..
        }) => match pending_key.take() {
            None => {
                let key = match node {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null => "null".to_string(),
                    _ => {
                        return Err(YamlError {
                            pos,
                            message: "a mapping key must be a plain value, not a list or mapping"
                                .into(),
                        })
                    }
                };
                if map.contains_key(&key) {
                    return Err(YamlError {
                        pos,
                        message: format!("duplicate key `{key}` in the same mapping; keep one"),
                    });
                }
                positions.insert(format!("{pointer}/{}", escape_pointer(&key)), pos);
                *pending_key = Some((key, pos));
            }
            Some((key, _)) => {
                if key == "<<" {
                    positions.remove(&format!("{pointer}/<<"));
                    merges.push(node);
                } else {
                    map.insert(key, node);
                }
            }
        },
    }
    Ok(())
}

/// YAML 1.2 core schema resolution for plain scalars; everything quoted is a string.
fn resolve_scalar(text: &str, style: ScalarStyle, tag: Option<&str>) -> Value {
    match tag {
        Some("!!str") => return Value::String(text.to_string()),
        Some("!!null") => return Value::Null,
        Some("!!bool") | Some("!!int") | Some("!!float") => {}
        Some(_) => return Value::String(text.to_string()),
        None => {
            if style != ScalarStyle::Plain {
                return Value::String(text.to_string());
            }
        }
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let body = text.strip_prefix(['+', '-']).unwrap_or(text);
    let neg = text.starts_with('-');
    if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = text.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = text.parse::<u64>() {
            return Value::Number(u.into());
        }
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Value::Number(i.into());
        }
    }
    if let Some(oct) = text.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(oct, 8) {
            return Value::Number(i.into());
        }
    }
    match body {
        ".inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN" => {
            // JSON has no infinities: keep the text so a schema names the type problem.
            return Value::String(text.to_string());
        }
        _ => {}
    }
    let looks_float = body
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && body.bytes().any(|b| b.is_ascii_digit())
        && body.starts_with(|c: char| c.is_ascii_digit() || c == '.');
    if looks_float {
        if let Ok(f) = text.parse::<f64>() {
            if let Some(n) = Number::from_f64(f) {
                let _ = neg;
                return Value::Number(n);
            }
        }
    }
    Value::String(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> Document {
        let mut d = parse_documents(text, YamlLimits::default()).unwrap();
        assert_eq!(d.len(), 1, "{d:?}");
        d.remove(0)
    }

    #[test]
    fn scalars_resolve_by_core_schema() {
        let d = one("a: 1\nb: true\nc: '1'\nd: ~\ne: 1.5\nf: hello\ng: 0x10\nh: -3\n");
        assert_eq!(
            d.value,
            json!({"a":1,"b":true,"c":"1","d":null,"e":1.5,"f":"hello","g":16,"h":-3})
        );
    }

    #[test]
    fn positions_point_at_keys_and_items() {
        let d = one("kind: Mapping\nspec:\n  prefix: /x/\n  list:\n    - a\n    - b\n");
        assert_eq!(d.pos_of("/spec/prefix"), Pos { line: 3, column: 3 });
        assert_eq!(d.pos_of("/spec/list/1"), Pos { line: 6, column: 7 });
        assert_eq!(d.pos_of("/spec/missing"), Pos { line: 2, column: 1 });
    }

    #[test]
    fn multiple_documents_and_empty_ones() {
        let docs = parse_documents("a: 1\n---\n---\nb: 2\n", YamlLimits::default()).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[1].value, Value::Null);
        assert_eq!(docs[2].pos.line, 3);
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            s.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        let err = parse_documents(&s, YamlLimits::default()).unwrap_err();
        assert!(err.message.contains("alias bomb"), "{}", err.message);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let s = "[".repeat(200) + &"]".repeat(200);
        let err = parse_documents(&s, YamlLimits::default()).unwrap_err();
        assert!(err.message.contains("nests deeper"), "{}", err.message);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse_documents("a: 1\na: 2\n", YamlLimits::default()).unwrap_err();
        assert_eq!(err.pos.line, 2);
        assert!(err.message.contains("duplicate key `a`"));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse_documents("a: [1, 2\nb: 3\n", YamlLimits::default()).unwrap_err();
        assert!(err.pos.line >= 1);
        assert!(err.message.starts_with("YAML syntax error"));
    }

    #[test]
    fn merge_keys_and_aliases() {
        let d = one("base: &b {x: 1, y: 2}\nder:\n  <<: *b\n  y: 3\n");
        assert_eq!(d.value["der"], json!({"x":1,"y":3}));
    }
}

/// Write a JSON value as block-style YAML (for generated manifests). Strings that a YAML
/// reader could take for something else are double-quoted with JSON escapes, which YAML reads
/// back identically.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    emit(v, 0, &mut out, false);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => {
            let plain_ok = !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
                && !matches!(
                    resolve_scalar(s, ScalarStyle::Plain, None),
                    Value::Number(_) | Value::Bool(_) | Value::Null
                )
                && !s.starts_with(['-', '.', '/']);
            if plain_ok {
                s.clone()
            } else {
                Value::String(s.clone()).to_string()
            }
        }
        Value::Object(m) if m.is_empty() => "{}".into(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        other => other.to_string(),
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty()) || matches!(v, Value::Array(a) if !a.is_empty())
}

/// `inline_first`: the first line continues a `- ` already written (a mapping in a list).
fn emit(v: &Value, indent: usize, out: &mut String, inline_first: bool) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (i, (k, val)) in m.iter().enumerate() {
                if !(inline_first && i == 0) {
                    out.push_str(&pad);
                }
                out.push_str(&scalar(&Value::String(k.clone())));
                out.push(':');
                if is_block(val) {
                    out.push('\n');
                    let child = if matches!(val, Value::Array(_)) {
                        indent
                    } else {
                        indent + 2
                    };
                    emit(val, child, out, false);
                } else {
                    out.push(' ');
                    out.push_str(&scalar(val));
                    out.push('\n');
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, item) in a.iter().enumerate() {
                if !(inline_first && i == 0) {
                    out.push_str(&pad);
                }
                out.push_str("- ");
                if is_block(item) {
                    emit(item, indent + 2, out, true);
                } else {
                    out.push_str(&scalar(item));
                    out.push('\n');
                }
            }
        }
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod emit_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml_round_trips() {
        let v = json!({
            "a": "plain", "b": "needs: quoting", "c": "123", "d": 5, "e": true, "f": null,
            "g": [1, "two", {"x": 1, "y": [true, {}]}, []], "h": {"i": {"j": "k"}}, "l": {},
            "m": "", "n": "-dash", "o": "multi\nline", "p": [[1, 2], [3]]
        });
        let text = to_yaml(&v);
        let back = parse_documents(&text, YamlLimits::default()).unwrap();
        assert_eq!(back[0].value, v, "{text}");
    }
}
