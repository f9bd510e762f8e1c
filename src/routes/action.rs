//! What a matched route does to a request, as pure functions: the path sent upstream and the
//! `Location` of a redirect. The proxy and route tests both call these, so a route test checks
//! exactly what the proxy will do.

use std::borrow::Cow;

use super::{Action, PathMatch, RedirectPath, Rewrite, Route};

impl Route {
    /// The part of `path` after the matched prefix (empty for exact and regex matches, whose
    /// matched part is the whole path, as in Envoy).
    pub fn after_prefix<'p>(&self, path: &'p str) -> &'p str {
        match &self.matcher.path {
            PathMatch::Prefix(p) => path.get(p.len()..).unwrap_or(""),
            PathMatch::Exact(_) | PathMatch::Regex(_) => "",
        }
    }

    /// The path and query the upstream receives, for a forwarding route. Always starts with `/`.
    pub fn upstream_path(&self, path: &str, query: Option<&str>) -> Option<String> {
        let Action::Forward(f) = &self.action else {
            return None;
        };
        let qlen = query.map_or(0, |q| q.len() + 1);
        let mut out = match &f.rewrite {
            Rewrite::Keep => {
                let mut s = String::with_capacity(path.len() + qlen + 1);
                s.push_str(path);
                s
            }
            Rewrite::Prefix(p) => {
                let rest = self.after_prefix(path);
                let mut s = String::with_capacity(p.len() + rest.len() + qlen + 1);
                s.push_str(p);
                s.push_str(rest);
                s
            }
            Rewrite::Regex {
                pattern,
                substitution,
            } => pattern
                .replace_all(path, substitution.as_str())
                .into_owned(),
        };
        if !out.starts_with('/') {
            out.insert(0, '/');
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }

    /// The `Location` of a redirecting route: scheme kept, host replaced when configured, path
    /// per path_redirect/prefix_redirect/regex_redirect, query kept.
    pub fn redirect_location(
        &self,
        scheme: &str,
        authority: &str,
        path: &str,
        query: Option<&str>,
    ) -> Option<(u16, String)> {
        let Action::Redirect(r) = &self.action else {
            return None;
        };
        let new_path: Cow<'_, str> = match &r.path {
            RedirectPath::Keep => Cow::Borrowed(path),
            RedirectPath::Replace(p) => Cow::Borrowed(p.as_str()),
            RedirectPath::Prefix(p) => Cow::Owned(format!("{p}{}", self.after_prefix(path))),
            RedirectPath::Regex {
                pattern,
                substitution,
            } => pattern.replace_all(path, substitution.as_str()),
        };
        let host = r.host.as_deref().unwrap_or(authority);
        let mut loc = format!("{scheme}://{host}{new_path}");
        if let Some(q) = query {
            if !new_path.contains('?') {
                loc.push('?');
                loc.push_str(q);
            }
        }
        Some((r.status, loc))
    }
}
