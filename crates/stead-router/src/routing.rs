//! Deriving the app a request is for, from its host name or its path.
//!
//! Kept free of I/O and of hyper types so the rules can be unit-tested in
//! isolation: they decide which app's code a request reaches.

use std::borrow::Cow;

/// Which app a request is for and how its path must be rewritten.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AppTarget<'a> {
    /// The app's name, lowercased.
    pub app: Cow<'a, str>,
    /// Path (without query) to send upstream when it differs from the
    /// request's: `Some` for `/apps/<app>/...` routing, where the prefix is
    /// stripped.
    pub stripped_path: Option<&'a str>,
}

/// Normalises a configured domain: lowercase, no leading or trailing dot, so
/// that `Host` matching is a plain suffix comparison.
pub(crate) fn normalize_domain(domain: &str) -> String {
    domain.trim().trim_matches('.').to_ascii_lowercase()
}

/// The host part of a `Host` header value (or URI authority): without a
/// `:port` and without a trailing dot.
pub(crate) fn host_without_port(host: &str) -> &str {
    let host = if host.starts_with('[') {
        // IPv6 literal: `[::1]:8080`. Never an app host; keep it whole up to `]`.
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// The app named by a host of the form `<app>.<domain>`, if any. `domain` must
/// already be normalised (see [`normalize_domain`]).
pub(crate) fn app_from_host<'a>(host: &'a str, domain: &str) -> Option<Cow<'a, str>> {
    let host = host_without_port(host);
    if host.len() <= domain.len() + 1 {
        return None;
    }
    let split = host.len() - domain.len();
    // `split - 1` is the dot; both slices are on ASCII boundaries only if the
    // byte there really is a dot, which is checked before slicing further.
    if host.as_bytes()[split - 1] != b'.' || !host.is_char_boundary(split) {
        return None;
    }
    if !host[split..].eq_ignore_ascii_case(domain) {
        return None;
    }
    let label = &host[..split - 1];
    if label.is_empty() || label.contains('.') {
        return None;
    }
    if label.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(label.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(label))
    }
}

/// The app named by a path `/apps/<app>[/rest]`, and the path to forward
/// (`/rest`, or `/` when there is no rest).
pub(crate) fn app_from_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/apps/")?;
    let end = rest.find('/').unwrap_or(rest.len());
    let app = &rest[..end];
    if app.is_empty() {
        return None;
    }
    let tail = &rest[end..];
    Some((app, if tail.is_empty() { "/" } else { tail }))
}

/// Derives the target app: the host name wins (an app host forwards its path
/// untouched, even one that starts with `/apps/`), then the path prefix.
pub(crate) fn derive<'a>(
    host: Option<&'a str>,
    path: &'a str,
    domain: &str,
) -> Option<AppTarget<'a>> {
    if let Some(app) = host.and_then(|h| app_from_host(h, domain)) {
        return Some(AppTarget {
            app,
            stripped_path: None,
        });
    }
    let (app, tail) = app_from_path(path)?;
    let app = if app.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(app.to_ascii_lowercase())
    } else {
        Cow::Borrowed(app)
    };
    Some(AppTarget {
        app,
        stripped_path: Some(tail),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_routing() {
        let d = "localhost";
        assert_eq!(
            app_from_host("hello.localhost", d).as_deref(),
            Some("hello")
        );
        assert_eq!(
            app_from_host("hello.localhost:8080", d).as_deref(),
            Some("hello")
        );
        assert_eq!(
            app_from_host("Hello.LocalHost.", d).as_deref(),
            Some("hello")
        );
        assert_eq!(app_from_host("localhost", d), None);
        assert_eq!(app_from_host("localhost:8080", d), None);
        assert_eq!(app_from_host(".localhost", d), None);
        assert_eq!(app_from_host("a.b.localhost", d), None);
        assert_eq!(app_from_host("hellolocalhost", d), None);
        assert_eq!(app_from_host("[::1]:8080", d), None);
        assert_eq!(app_from_host("127.0.0.1:80", d), None);
        assert_eq!(
            app_from_host("shop.apps.example.com", "apps.example.com").as_deref(),
            Some("shop")
        );
        assert_eq!(app_from_host("é.localhost", d).as_deref(), Some("é"));
    }

    #[test]
    fn path_routing() {
        assert_eq!(app_from_path("/apps/hello"), Some(("hello", "/")));
        assert_eq!(app_from_path("/apps/hello/"), Some(("hello", "/")));
        assert_eq!(app_from_path("/apps/hello/a/b"), Some(("hello", "/a/b")));
        assert_eq!(app_from_path("/apps/"), None);
        assert_eq!(app_from_path("/apps"), None);
        assert_eq!(app_from_path("/apps//x"), None);
        assert_eq!(app_from_path("/other/hello"), None);
    }

    #[test]
    fn host_wins_over_path() {
        let t = derive(Some("one.localhost"), "/apps/two/x", "localhost").unwrap();
        assert_eq!(t.app, "one");
        assert_eq!(t.stripped_path, None);
        let t = derive(Some("localhost:1234"), "/apps/two/x", "localhost").unwrap();
        assert_eq!(t.app, "two");
        assert_eq!(t.stripped_path, Some("/x"));
        assert!(derive(Some("localhost"), "/metrics", "localhost").is_none());
        assert!(derive(None, "/", "localhost").is_none());
    }

    #[test]
    fn domain_normalisation() {
        assert_eq!(normalize_domain(" .Example.COM. "), "example.com");
    }
}
