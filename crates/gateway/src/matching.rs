//! Pure helpers for Gateway API matching semantics: hostnames (with wildcards), path prefixes
//! (segment-wise), prefix rewrites and durations.

use std::time::Duration;

/// Normalise a `Host` header / `:authority`: drop the port, lowercase, drop a trailing dot.
pub fn normalize_host(host: &str) -> String {
    normalize_host_cow(host).into_owned()
}

/// [`normalize_host`] without allocating when the host is already lower case (the usual case
/// on the request path).
pub fn normalize_host_cow(host: &str) -> std::borrow::Cow<'_, str> {
    let h = if host.starts_with('[') {
        // IPv6 literal: keep brackets, drop port.
        match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        }
    } else {
        match host.rfind(':') {
            Some(i) => &host[..i],
            None => host,
        }
    };
    let h = h.trim_end_matches('.');
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(h.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(h)
    }
}

/// Does a hostname pattern (`foo.example.com` or `*.example.com`) match a concrete host?
/// A wildcard matches one or more labels (`*.example.com` matches `a.b.example.com`) but not
/// `example.com` itself, as the Gateway API spec says.
pub fn hostname_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// Validate a Gateway API hostname (RFC 1123 DNS name, optionally with a leading `*.` label; no IPs).
pub fn validate_hostname(h: &str) -> Result<(), String> {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    if rest.is_empty() || h.len() > 253 {
        return Err(format!("hostname `{h}` is empty or too long"));
    }
    if rest.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("hostname `{h}` is an IP address; hostnames must be DNS names"));
    }
    for label in rest.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "hostname `{h}` is not a valid lowercase DNS name (optionally starting with `*.`)"
            ));
        }
    }
    Ok(())
}

/// Intersect a listener hostname with a route's hostnames.
///
/// Returns `None` when the route cannot attach (both specify hostnames and none overlap),
/// otherwise the effective hostnames the route serves on that listener (`None` inside = any host).
pub fn intersect_hostnames(listener: Option<&str>, route: &[String]) -> Option<Vec<Option<String>>> {
    match (listener, route.is_empty()) {
        (None, true) => Some(vec![None]),
        (None, false) => Some(route.iter().map(|h| Some(h.clone())).collect()),
        (Some(l), true) => Some(vec![Some(l.to_string())]),
        (Some(l), false) => {
            let mut out: Vec<Option<String>> = Vec::new();
            for h in route {
                let eff = if !h.starts_with('*') {
                    hostname_matches(l, h).then(|| h.clone())
                } else if !l.starts_with('*') {
                    hostname_matches(h, l).then(|| l.to_string())
                } else if h.len() >= l.len() {
                    // both wildcards: the more specific one, if it is inside the other
                    (h.ends_with(&l[1..])).then(|| h.clone())
                } else {
                    (l.ends_with(&h[1..])).then(|| l.to_string())
                };
                if let Some(e) = eff {
                    if !out.contains(&Some(e.clone())) {
                        out.push(Some(e));
                    }
                }
            }
            (!out.is_empty()).then_some(out)
        }
    }
}

/// Normalise a `PathPrefix` value: a trailing `/` is ignored (except for `/` itself, which
/// becomes the empty prefix that matches everything).
pub fn normalize_prefix(prefix: &str) -> String {
    prefix.trim_end_matches('/').to_string()
}

/// Segment-wise prefix match on a normalised prefix: `/api` matches `/api`, `/api/` and
/// `/api/x`, but not `/apix`.
pub fn path_prefix_matches(norm_prefix: &str, path: &str) -> bool {
    if norm_prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(norm_prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// `ReplacePrefixMatch`: replace the matched (normalised) prefix of `path` with `replacement`,
/// following the table in the Gateway API spec (`/foo/bar` with prefix `/foo` and replacement
/// `/xyz/` → `/xyz/bar`; replacement `` or `/` → `/bar`).
pub fn replace_prefix(path: &str, norm_prefix: &str, replacement: &str) -> String {
    let rest = path.strip_prefix(norm_prefix).unwrap_or(path);
    let rep = replacement.trim_end_matches('/');
    let out = format!("{rep}{rest}");
    if out.is_empty() {
        "/".to_string()
    } else if !out.starts_with('/') {
        format!("/{out}")
    } else {
        out
    }
}

/// Parse a Gateway API duration (GEP-2257): one to four `<number><unit>` parts, units `h`, `m`,
/// `s`, `ms`, e.g. `1h30m`, `500ms`, `0s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a Gateway API duration (like `10s`, `500ms`, `1h30m`)");
    let mut total = Duration::ZERO;
    let mut rest = s;
    let mut parts = 0;
    if s.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (d, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(n * 3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += d;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    Ok(total)
}

/// The first value of query parameter `name` in a raw query string (percent-decoded).
pub fn query_param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Decode a raw query string into pairs.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(normalize_host("Foo.Example.com:8080"), "foo.example.com");
        assert_eq!(normalize_host("foo.example.com."), "foo.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert!(hostname_matches("*.example.com", "a.example.com"));
        assert!(hostname_matches("*.example.com", "a.b.example.com"));
        assert!(!hostname_matches("*.example.com", "example.com"));
        assert!(!hostname_matches("*.example.com", "aexample.com"));
        assert!(hostname_matches("a.example.com", "a.example.com"));
        assert!(!hostname_matches("a.example.com", "b.example.com"));
        assert!(validate_hostname("*.example.com").is_ok());
        assert!(validate_hostname("Example.com").is_err());
        assert!(validate_hostname("10.0.0.1").is_err());
        assert!(validate_hostname("a..b").is_err());
        assert!(validate_hostname("*").is_err());
    }

    #[test]
    fn hostname_intersection_follows_spec() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(intersect_hostnames(None, &[]), Some(vec![None]));
        assert_eq!(intersect_hostnames(Some("a.com"), &[]), Some(vec![Some("a.com".into())]));
        assert_eq!(intersect_hostnames(None, &s(&["x.com"])), Some(vec![Some("x.com".into())]));
        // listener wildcard, route exact inside it
        assert_eq!(
            intersect_hostnames(Some("*.example.com"), &s(&["foo.example.com", "other.org"])),
            Some(vec![Some("foo.example.com".into())])
        );
        // listener exact, route wildcard covering it
        assert_eq!(
            intersect_hostnames(Some("foo.example.com"), &s(&["*.example.com"])),
            Some(vec![Some("foo.example.com".into())])
        );
        // both wildcards: the narrower wins
        assert_eq!(
            intersect_hostnames(Some("*.example.com"), &s(&["*.foo.example.com"])),
            Some(vec![Some("*.foo.example.com".into())])
        );
        assert_eq!(
            intersect_hostnames(Some("*.foo.example.com"), &s(&["*.example.com"])),
            Some(vec![Some("*.foo.example.com".into())])
        );
        assert_eq!(intersect_hostnames(Some("foo.example.com"), &s(&["bar.example.com"])), None);
        assert_eq!(intersect_hostnames(Some("*.example.com"), &s(&["example.com"])), None);
    }

    #[test]
    fn prefix_is_segment_wise() {
        let p = normalize_prefix("/api");
        assert!(path_prefix_matches(&p, "/api"));
        assert!(path_prefix_matches(&p, "/api/"));
        assert!(path_prefix_matches(&p, "/api/x"));
        assert!(!path_prefix_matches(&p, "/apix"));
        assert!(!path_prefix_matches(&p, "/ap"));
        let p = normalize_prefix("/api/");
        assert!(path_prefix_matches(&p, "/api"));
        assert!(path_prefix_matches(&p, "/api/v"));
        let root = normalize_prefix("/");
        assert!(path_prefix_matches(&root, "/anything"));
    }

    #[test]
    fn replace_prefix_table_from_spec() {
        let cases = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
        ];
        for (path, prefix, rep, want) in cases {
            assert_eq!(replace_prefix(path, &normalize_prefix(prefix), rep), want, "{path} {prefix} {rep}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1s500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["", "10", "s", "1d", "-1s", "1.5s", "123456s", "1h1h1h1h1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn query() {
        let q = parse_query("a=1&b=x%20y&a=2");
        assert_eq!(query_param(&q, "a"), Some("1"));
        assert_eq!(query_param(&q, "b"), Some("x y"));
        assert_eq!(query_param(&q, "A"), None);
    }
}
