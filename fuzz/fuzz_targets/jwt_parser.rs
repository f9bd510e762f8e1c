//! Arbitrary key sets and tokens: parsing a JWKS document and validating a token against it
//! must never panic, whatever the bytes.
#![no_main]

use std::sync::OnceLock;

use legate::policy::jwt::{parse_jwks, JwtPolicy, JwtPolicySpec};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static JwtPolicy {
    static P: OnceLock<JwtPolicy> = OnceLock::new();
    P.get_or_init(|| {
        let spec: JwtPolicySpec = serde_json::from_value(serde_json::json!({
            "issuer": "https://issuer.example",
            "audiences": ["api"],
            "jwks": {"file": "/nonexistent/jwks.json"},
            "required_claims": ["sub"],
        }))
        .expect("spec");
        JwtPolicy::compile("fuzz".into(), &spec).expect("policy")
    })
}

fuzz_target!(|data: &[u8]| {
    // `<jwks json>\0<token>`; without a NUL the whole input is the token.
    let (jwks, token) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"{\"keys\":[]}"[..], data),
    };
    let keys = parse_jwks(jwks).unwrap_or_default();
    let token = String::from_utf8_lossy(token);
    let _ = policy().validate(&token, &keys, 1_700_000_000);
});
