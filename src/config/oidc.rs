//! `OIDCLogin` as written and its compilation onto the Forward routes it covers (the plain
//! `routes::guard::OidcLogin`). Pure: no I/O; the secrets it names are read by `crate::guard`
//! at request time and by preflight before a revision is applied.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use super::guard::Coverage;
use super::model::{LabelSelector, Resource, Spec};
use super::Diagnostic;
use crate::routes::guard::OidcLogin;
use crate::routes::{Action, Group, HostRoute, PathMatch, Route};

/// The OIDCLogin spec.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct OidcLoginSpec {
    pub issuer: String,
    pub client_id: String,
    /// Directory under `--secrets-dir` with `client-secret` and `session-keys`.
    pub secret: String,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub path_prefix: Option<String>,
    pub cookie_name: Option<String>,
    pub forward_claims: BTreeMap<String, String>,
    pub refresh_before_seconds: Option<u64>,
    pub post_logout_redirect_uri: Option<String>,
    pub clock_skew_seconds: Option<u64>,
    pub mappings: Vec<String>,
    #[serde(rename = "mappingSelector")]
    pub mapping_selector: Option<LabelSelector>,
    pub hosts: Vec<String>,
}

/// A compile problem: JSON pointer, message, help.
type CompileError = (&'static str, String, String);

/// Whether `u` may be used to reach the provider: https, or plain http on loopback only.
fn reachable_url(u: &str) -> bool {
    let ok = u.starts_with("https://")
        || u.starts_with("http://127.0.0.1")
        || u.starts_with("http://localhost")
        || u.starts_with("http://[::1]");
    ok && u
        .parse::<http::Uri>()
        .is_ok_and(|p| p.authority().is_some())
}

impl OidcLogin {
    pub fn compile(name: String, spec: &OidcLoginSpec) -> Result<OidcLogin, CompileError> {
        if !reachable_url(&spec.issuer) {
            return Err((
                "/spec/issuer",
                format!("issuer `{}` is not an https:// URL", spec.issuer),
                "write the issuer exactly as the provider's ID tokens name it, e.g. `https://example.okta.com/oauth2/default` (plain http only for loopback)".into(),
            ));
        }
        if spec.client_id.is_empty() {
            return Err((
                "/spec/client_id",
                "client_id is empty".into(),
                "copy the client id of the application registered at the provider".into(),
            ));
        }
        let secret_ok = !spec.secret.is_empty()
            && spec.secret != "."
            && spec.secret != ".."
            && !spec.secret.contains(['/', '\\']);
        if !secret_ok {
            return Err((
                "/spec/secret",
                format!("secret `{}` is not a secret name", spec.secret),
                "name a directory under --secrets-dir holding `client-secret` and `session-keys`"
                    .into(),
            ));
        }
        let prefix = spec.path_prefix.as_deref().unwrap_or("/.legate");
        let prefix_ok = prefix.len() > 1
            && prefix.starts_with('/')
            && !prefix.ends_with('/')
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b));
        if !prefix_ok {
            return Err((
                "/spec/path_prefix",
                format!("path_prefix `{prefix}` is not a path prefix"),
                "write a path like `/.legate` (callback at `/.legate/callback`, logout at `/.legate/logout`)".into(),
            ));
        }
        let cookie = spec.cookie_name.as_deref().unwrap_or("legate_session");
        let cookie_ok = !cookie.is_empty()
            && cookie.len() <= 64
            && cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
        if !cookie_ok {
            return Err((
                "/spec/cookie_name",
                format!("cookie_name `{cookie}` is not a cookie name"),
                "use letters, digits, `-` and `_`".into(),
            ));
        }
        if let Some(u) = &spec.post_logout_redirect_uri {
            if !u.starts_with("https://") && !u.starts_with("http://") {
                return Err((
                    "/spec/post_logout_redirect_uri",
                    format!("post_logout_redirect_uri `{u}` is not an absolute URL"),
                    "register it at the provider and write it in full, e.g. `https://app.example.com/`".into(),
                ));
            }
        }
        let forward = super::guard::forward_claims(&spec.forward_claims)?;
        let mut scopes = vec!["openid".to_string()];
        for s in &spec.scopes {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        if spec.scopes.is_empty() {
            scopes.extend(["profile".to_string(), "email".to_string()]);
        }
        Ok(OidcLogin {
            name,
            issuer: spec.issuer.clone(),
            client_id: spec.client_id.clone(),
            secret: spec.secret.clone(),
            scopes,
            audiences: if spec.audiences.is_empty() {
                vec![spec.client_id.clone()]
            } else {
                spec.audiences.clone()
            },
            prefix: prefix.to_string(),
            cookie: cookie.to_string(),
            forward,
            refresh_before: spec.refresh_before_seconds.unwrap_or(60),
            post_logout_redirect: spec.post_logout_redirect_uri.clone(),
            skew: spec.clock_skew_seconds.unwrap_or(60),
        })
    }
}

/// Each OIDCLogin onto the Mappings it names or selects and those of the Hosts it names. Runs
/// after the JWTPolicies are attached: a route may have one or the other, not both (an
/// OIDCLogin accepts its provider's bearer tokens itself).
pub fn attach(
    resources: &[&Resource],
    routes: &mut [Route],
    hosts: &[HostRoute],
    groups: &[Group],
    diags: &mut Vec<Diagnostic>,
) {
    let logins: Vec<(&Resource, &OidcLoginSpec)> = super::model::of_kind(resources, |s| match s {
        Spec::OidcLogin(p) => Some(&**p),
        _ => None,
    });
    for (res, spec) in logins {
        let login = match OidcLogin::compile(res.id(), spec) {
            Ok(p) => Arc::new(p),
            Err((pointer, msg, help)) => {
                diags.push(
                    Diagnostic::error("bad-oidclogin", &res.at(pointer), msg).with_help(help),
                );
                continue;
            }
        };
        let targets = Coverage {
            kind: "OIDCLogin",
            codes: [
                "oidc-unknown-mapping",
                "oidc-unknown-host",
                "oidc-selects-nothing",
            ],
            mappings: &spec.mappings,
            selector: spec.mapping_selector.as_ref(),
            hosts: &spec.hosts,
        }
        .targets(res, resources, routes, hosts, groups, diags);
        warn_unrouted_callback(res, &login, routes, &targets, diags);
        for (route, _) in routes.iter_mut().zip(targets).filter(|(_, t)| *t) {
            let Action::Forward(f) = &mut route.action else {
                continue;
            };
            let clash = match (&f.oidc, &f.jwt) {
                (Some(other), _) => Some(format!("OIDCLogin `{}`", other.name)),
                (None, Some(jwt)) => Some(format!("JWTPolicy `{}`", jwt.name)),
                (None, None) => None,
            };
            if let Some(other) = clash {
                diags.push(
                    Diagnostic::error(
                        "oidc-overlap",
                        &res.at("/spec"),
                        format!(
                            "Mapping `{}` is covered by {other} and by OIDCLogin `{}`",
                            route.name,
                            res.id()
                        ),
                    )
                    .with_help("let one OIDCLogin or JWTPolicy cover each Mapping (an OIDCLogin also accepts its provider's bearer tokens)"),
                );
                continue;
            }
            f.oidc = Some(login.clone());
        }
    }
}

/// The provider sends the browser back to `<prefix>/callback`: a covered route must route that
/// path, or the login can never complete.
fn warn_unrouted_callback(
    res: &Resource,
    login: &OidcLogin,
    routes: &[Route],
    targets: &[bool],
    diags: &mut Vec<Diagnostic>,
) {
    let callback = format!("{}/callback", login.prefix);
    let routed = routes.iter().zip(targets).any(|(r, t)| {
        *t && match &r.matcher.path {
            PathMatch::Prefix(p) => callback.starts_with(p.as_str()),
            PathMatch::Exact(p) => *p == callback,
            PathMatch::Regex(re) => re.is_match(&callback),
        }
    });
    if targets.contains(&true) && !routed {
        diags.push(
            Diagnostic::warning(
                "oidc-callback-unrouted",
                &res.at("/spec"),
                format!(
                    "OIDCLogin `{}` covers no Mapping that routes `{callback}`, where the provider sends the browser back",
                    res.name
                ),
            )
            .with_help(format!(
                "cover a Mapping whose prefix matches `{callback}` (e.g. `prefix: /`), or set `path_prefix` under a covered Mapping's prefix"
            )),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> OidcLoginSpec {
        OidcLoginSpec {
            issuer: "https://idp.example.com".into(),
            client_id: "app".into(),
            secret: "app-oidc".into(),
            ..OidcLoginSpec::default()
        }
    }

    #[test]
    fn defaults_ask_for_openid_profile_email_and_accept_the_client_id_as_audience() {
        let l = OidcLogin::compile("ns/l".into(), &spec()).unwrap();
        assert_eq!(l.scopes, ["openid", "profile", "email"]);
        assert_eq!(l.audiences, ["app"]);
        assert_eq!(l.prefix, "/.legate");
        assert_eq!(l.cookie, "legate_session");
        let mut s = spec();
        s.scopes = vec!["offline_access".into()];
        let l = OidcLogin::compile("ns/l".into(), &s).unwrap();
        assert_eq!(l.scopes, ["openid", "offline_access"]);
    }

    #[test]
    fn bad_fields_are_refused_with_their_pointer() {
        let bad = |edit: fn(&mut OidcLoginSpec)| {
            let mut s = spec();
            edit(&mut s);
            OidcLogin::compile("ns/l".into(), &s).unwrap_err().0
        };
        assert_eq!(
            bad(|s| s.issuer = "http://idp.example.com".into()),
            "/spec/issuer"
        );
        assert_eq!(bad(|s| s.secret = "../etc".into()), "/spec/secret");
        assert_eq!(
            bad(|s| s.path_prefix = Some("/.legate/".into())),
            "/spec/path_prefix"
        );
        assert_eq!(
            bad(|s| s.cookie_name = Some("a b".into())),
            "/spec/cookie_name"
        );
        assert_eq!(
            bad(|s| s.post_logout_redirect_uri = Some("/home".into())),
            "/spec/post_logout_redirect_uri"
        );
        assert_eq!(bad(|s| s.client_id = String::new()), "/spec/client_id");
    }
}
