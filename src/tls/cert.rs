//! What Legate reads out of an X.509 certificate: its expiry (for the expiry metric) and the
//! `x-forwarded-client-cert` element of a verified client certificate, as Envoy formats it.
//! Parsing is `x509-cert`'s; nothing here verifies anything (rustls did).

use ring::digest;
use x509_cert::der::Decode;
use x509_cert::Certificate;

/// `notAfter` of a DER certificate, in seconds since the Unix epoch.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let c = Certificate::from_der(der).ok()?;
    let t = c.tbs_certificate.validity.not_after.to_unix_duration();
    i64::try_from(t.as_secs()).ok()
}

/// Envoy's `x-forwarded-client-cert` element for a client certificate:
/// `Hash=<sha256 of the DER, hex>;Subject="<RFC 4514 subject>"`, plus `URI=` and `DNS=` for
/// each such subject alternative name (Envoy's `SANITIZE_SET` with `Subject`, `URI`, `DNS`).
pub fn xfcc(der: &[u8]) -> String {
    let hash = digest::digest(&digest::SHA256, der);
    let mut out = String::from("Hash=");
    for b in hash.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    let Ok(c) = Certificate::from_der(der) else {
        return out;
    };
    let subject = c.tbs_certificate.subject.to_string();
    out.push_str(&format!(";Subject=\"{}\"", quote(&subject)));
    let sans = c
        .tbs_certificate
        .get::<x509_cert::ext::pkix::SubjectAltName>()
        .ok()
        .flatten();
    if let Some((_, san)) = sans {
        use x509_cert::ext::pkix::name::GeneralName;
        for n in &san.0 {
            match n {
                GeneralName::UniformResourceIdentifier(u) => {
                    out.push_str(&format!(";URI={}", u.as_str()))
                }
                GeneralName::DnsName(d) => out.push_str(&format!(";DNS={}", d.as_str())),
                _ => {}
            }
        }
    }
    out
}

/// Escape `"` and `\` inside a quoted XFCC value, as Envoy does.
fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
