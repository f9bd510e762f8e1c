//! A batch of [`Span`]s as an OTLP `ExportTraceServiceRequest` (prost-encoded).

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{self as proto, span::SpanKind, status::StatusCode};
use prost::Message;

use super::{Kind, Span, Value};

/// The protobuf body of one export: every span under one resource (`service.name`) and one
/// instrumentation scope (`legate`). The spans are moved out of `spans`, not copied.
pub fn request(spans: &mut Vec<Span>, service_name: &str) -> Vec<u8> {
    let resource = Resource {
        attributes: vec![
            kv("service.name", Value::Str(service_name.to_string())),
            kv(
                "service.version",
                Value::Str(env!("CARGO_PKG_VERSION").to_string()),
            ),
        ],
        ..Default::default()
    };
    let scope = InstrumentationScope {
        name: "legate".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![proto::ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![proto::ScopeSpans {
                scope: Some(scope),
                spans: spans.drain(..).map(span).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn span(s: Span) -> proto::Span {
    let kind = match s.kind {
        Kind::Server => SpanKind::Server,
        Kind::Client => SpanKind::Client,
    };
    let mut attributes: Vec<KeyValue> =
        s.attributes.iter().map(|(k, v)| kv(k, v.clone())).collect();
    let status = match &s.error {
        Some(e) => {
            attributes.push(kv("error.type", Value::Str(e.clone())));
            proto::Status {
                code: StatusCode::Error as i32,
                ..Default::default()
            }
        }
        None => proto::Status::default(),
    };
    proto::Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
        // The W3C flags, with "has-is-remote" (bit 8) and "is-remote" (bit 9) for a parent
        // from the client.
        flags: u32::from(s.flags)
            | match (s.kind, s.parent) {
                (Kind::Server, Some(_)) => 0x300,
                _ => 0x100,
            },
        name: s.name,
        kind: kind as i32,
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(s.end),
        attributes,
        status: Some(status),
        ..Default::default()
    }
}

fn kv(key: &str, v: Value) -> KeyValue {
    let value = match v {
        Value::Str(s) => any_value::Value::StringValue(s),
        Value::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn encodes_ids_links_kinds_and_attributes() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut server = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some([3; 8]),
            flags: 1,
            kind: Kind::Server,
            name: "GET /api/".into(),
            start,
            end: start + Duration::from_millis(5),
            error: None,
            attributes: Vec::new(),
        };
        server.str("http.request.method", "GET");
        server.int("http.response.status_code", 200);
        let mut client = server.clone();
        client.kind = Kind::Client;
        client.span_id = [4; 8];
        client.parent = Some([2; 8]);
        client.error = Some("503".into());
        let body = request(&mut vec![server, client], "edge");
        let got = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let rs = &got.resource_spans[0];
        let svc = &rs.resource.as_ref().unwrap().attributes[0];
        assert_eq!(svc.key, "service.name");
        let spans = &rs.scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].trace_id, vec![1; 16]);
        assert_eq!(spans[0].parent_span_id, vec![3; 8]);
        assert_eq!(spans[0].kind, SpanKind::Server as i32);
        assert_eq!(spans[0].flags, 0x301);
        assert_eq!(
            spans[0].end_time_unix_nano - spans[0].start_time_unix_nano,
            5_000_000
        );
        assert_eq!(spans[1].parent_span_id, spans[0].span_id);
        assert_eq!(spans[1].kind, SpanKind::Client as i32);
        assert_eq!(
            spans[1].status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
        let status = spans[0]
            .attributes
            .iter()
            .find(|a| a.key == "http.response.status_code")
            .unwrap();
        assert_eq!(
            status.value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(200))
        );
    }
}
