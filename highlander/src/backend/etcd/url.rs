//! The `etcd://` and `etcds://` URL: endpoints, credentials, namespace and
//! options parsed into an [`Etcd`] configuration, with errors that never
//! quote a credential (the grammar is in the parent module's docs).

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use super::{Etcd, KEEPALIVE, START_TIMEOUT, TTL, Tls};
use crate::backend::Backend;
use crate::backend::kit::duration;
use crate::backend::kit::url::percent_decode;
use crate::{Error, Result};

/// `host:port` of an endpoint written as `host:port`, `http://host:port` or
/// `https://host:port`.
pub(super) fn host_port(endpoint: &str) -> Option<&str> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.is_empty()
        || host.contains(['/', '@', ' ', '?', '#'])
        || (host.contains(':') && !bracketed)
        || port.parse::<u16>().is_err()
    {
        return None;
    }
    Some(rest)
}

/// The value of duration option `option`, in the kit's grammar (a unit is
/// required: `500ms`, `5s`, `2m`). A value that is no duration gets the
/// kit's message, which names the option and `range`; whether a duration
/// is in range is [`Etcd::validate`]'s to say, as for the builder's.
fn duration(option: &str, value: &str, range: RangeInclusive<Duration>) -> Result<Duration> {
    duration::parse(value).map_err(|_| {
        let why = duration::ranged(option, value, range)
            .err()
            .unwrap_or_default();
        bad(&why)
    })
}

/// `value` with its `%XX` escapes decoded; `what` names it in the error,
/// which never quotes the value (it may be a password).
fn decoded(what: &str, value: &str) -> Result<String> {
    percent_decode(value).map_err(|why| bad(&format!("{what}: {why}")))
}

/// An error about the URL. The message describes the problem; it never
/// repeats the URL, whose password may not be where the parser thinks it
/// is.
fn bad(why: &str) -> Error {
    Error::config(format!("invalid etcd URL: {why}"))
}

/// The backend named by an `etcd://` or `etcds://` URL (see the module docs).
pub(crate) fn from_url(url: &str) -> Result<Box<dyn Backend>> {
    Ok(Box::new(parse_url(url)?))
}

/// A part of `url` that may be quoted in an error: one that lies wholly
/// after the last `@`. A password with a `/`, `?` or `#` that was not
/// percent-encoded ends the authority early and spills into what would be
/// the endpoints, the path or the options, so nothing before the last `@`
/// is ever quoted (and the URL itself never is).
fn quotable<'a>(url: &str, part: &'a str) -> Option<&'a str> {
    let secret_end = url.rfind('@').map_or(0, |i| i + 1);
    let offset = (part.as_ptr() as usize).checked_sub(url.as_ptr() as usize)?;
    (offset >= secret_end && offset + part.len() <= url.len()).then_some(part)
}

/// The hint for a URL whose credentials may have spilled.
const ENCODE_HINT: &str = "(a password with `/`, `?`, `#` or `@` must be percent-encoded: %2F, \
                           %3F, %23, %40)";

fn parse_url(url: &str) -> Result<Etcd> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected etcd://host:port"))?;
    let tls = match scheme {
        "etcd" => false,
        "etcds" => true,
        _ => return Err(bad("the scheme must be etcd:// or etcds://")),
    };
    let (head, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match head.find('/') {
        Some(i) => (&head[..i], &head[i + 1..]),
        None => (head, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let hosts: Vec<&str> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err(bad("no endpoint: expected etcd://host:port[,host:port…]"));
    }
    for (n, e) in hosts.iter().enumerate() {
        if host_port(e).is_none() {
            return Err(bad(&match quotable(url, e) {
                Some(e) => format!("endpoint `{e}` is not host:port"),
                None => format!("endpoint {} is not host:port {ENCODE_HINT}", n + 1),
            }));
        }
    }
    if path.contains('@') {
        return Err(bad(&format!(
            "an `@` after the endpoints {ENCODE_HINT}; a namespace with `@` goes in ?namespace="
        )));
    }
    let mut etcd = Etcd::new(hosts.iter().map(|h| h.to_string()));
    let namespace = path.trim_matches('/');
    if !namespace.is_empty() {
        etcd = etcd.namespace(namespace);
    }
    let mut user: Option<String> = None;
    let mut password: Option<String> = None;
    if let Some(info) = userinfo {
        match info.split_once(':') {
            Some((u, p)) => {
                user = Some(decoded("the user name", u)?);
                password = Some(decoded("the password", p)?);
            }
            None => user = Some(decoded("the user name", info)?),
        }
    }
    let mut tls_settings = Tls::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let text = |what: &str| decoded(&format!("`{what}`"), value);
        match key {
            "ttl" => etcd.ttl = duration(key, value, TTL)?,
            "keepalive" => etcd.keepalive = Some(duration(key, value, KEEPALIVE)?),
            // `connect_timeout` is its old name.
            "start_timeout" | "connect_timeout" => {
                etcd.start_timeout = Some(duration(key, value, START_TIMEOUT)?);
            }
            "namespace" => etcd.namespace = text(key)?,
            "user" => user = Some(text(key)?),
            "password" => password = Some(text(key)?),
            "ca" => tls_settings.ca = Some(PathBuf::from(text(key)?)),
            "cert" | "key" => {
                let path = PathBuf::from(text(key)?);
                let (cert, key_path) = tls_settings.identity.get_or_insert_with(Default::default);
                let target = if key == "cert" { cert } else { key_path };
                *target = path;
            }
            "domain" => tls_settings.domain = Some(text(key)?),
            other => {
                let named = match quotable(url, other) {
                    Some(other) => format!("unknown option `{other}`"),
                    None => format!("an unknown option {ENCODE_HINT}"),
                };
                return Err(bad(&format!(
                    "{named}: use ttl, keepalive, start_timeout, namespace, user, password, \
                     ca, cert, key or domain"
                )));
            }
        }
    }
    if let Some((cert, key)) = &tls_settings.identity
        && (cert.as_os_str().is_empty() || key.as_os_str().is_empty())
    {
        return Err(bad("a client certificate needs both `cert` and `key`"));
    }
    match (user, password) {
        (Some(u), p) => etcd = etcd.user(u, p.unwrap_or_default()),
        (None, Some(_)) => return Err(bad("a password without a user")),
        (None, None) => {}
    }
    let wants_tls = tls || tls_settings.ca.is_some() || tls_settings.identity.is_some();
    if wants_tls {
        if !tls {
            return Err(bad("TLS options (ca, cert, key) need the etcds:// scheme"));
        }
        etcd.tls = Some(tls_settings);
    } else if tls_settings.domain.is_some() {
        return Err(bad("`domain` needs the etcds:// scheme"));
    }
    etcd.validate()?;
    Ok(etcd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::etcd::{DEFAULT_NAMESPACE, DEFAULT_TTL};

    #[test]
    fn parses_endpoints_namespace_and_options() {
        let e = parse_url("etcd://a:2379,b:2380/billing?ttl=5s&keepalive=250ms").unwrap();
        assert_eq!(e.endpoints, vec!["a:2379", "b:2380"]);
        assert_eq!(e.namespace, "billing");
        assert_eq!(e.ttl, Duration::from_secs(5));
        assert_eq!(e.keepalive_in_effect(), Duration::from_millis(250));
        let d = parse_url("etcd://a:2379").unwrap();
        assert_eq!(d.namespace, DEFAULT_NAMESPACE);
        assert_eq!(d.ttl, DEFAULT_TTL);
        assert_eq!(d.keepalive_in_effect(), Duration::from_secs(1));
    }

    #[test]
    fn hides_the_password_everywhere() {
        let e = parse_url("etcd://app:hunter2@a:2379?ttl=3s").unwrap();
        assert!(!format!("{e:?}").contains("hunter2"));
        assert!(!e.describe().contains("hunter2"));
        assert_eq!(e.user.as_ref().map(|(_, p)| p.expose()), Some("hunter2"));
        let q = parse_url("etcd://a:2379?user=app&password=hunter2").unwrap();
        assert!(!q.describe().contains("hunter2"));
        let err = parse_url("etcd://app:hunter2@a:2379?bogus=1")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("unknown option `bogus`"), "{err}");
    }

    #[test]
    fn rejects_bad_urls_in_one_line() {
        for (url, want) in [
            ("etcd://", "no endpoint"),
            ("etcd://host", "not host:port"),
            ("etcd://host:notaport", "not host:port"),
            ("etcd://a:2379?ttl=soon", "duration"),
            ("etcd://a:2379?ttl=1s", "minimum lease TTL"),
            ("etcds://a:2379", "CA certificate"),
            ("etcd://a:2379?ca=/x.pem", "etcds://"),
            ("etcd://a:2379?password=x", "without a user"),
        ] {
            let err = parse_url(url).unwrap_err().to_string();
            assert!(err.contains(want), "{url}: {err}");
            assert!(!err.contains('\n'), "{url}: {err}");
        }
    }

    #[test]
    fn out_of_range_numbers_are_one_line_errors_not_panics() {
        for (url, want) in [
            ("etcd://a:2379?ttl=99999999999999999999999", "ttl"),
            ("etcd://a:2379?ttl=100000000", "ttl"),
            ("etcd://a:2379?keepalive=0ms", "keepalive"),
            (
                "etcd://a:2379?keepalive=99999999999999999999999",
                "keepalive",
            ),
            ("etcd://a:2379?ttl=10s&keepalive=5s", "keepalive"),
            ("etcd://a:2379?connect_timeout=0", "connect_timeout"),
            (
                "etcd://a:2379?connect_timeout=99999999999999999999999m",
                "connect_timeout",
            ),
        ] {
            let err = parse_url(url).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("between"),
                "{url}: {err}"
            );
            assert!(!err.contains('\n'), "{url}: {err}");
        }
        // The builder is checked the same way (connect() validates).
        for etcd in [
            Etcd::new(["a:2379"]).ttl(Duration::MAX),
            Etcd::new(["a:2379"]).keepalive_interval(Duration::ZERO),
            Etcd::new(["a:2379"]).connect_timeout(Duration::MAX),
        ] {
            let err = etcd.validate().unwrap_err().to_string();
            assert!(err.contains("between"), "{err}");
        }
    }

    #[test]
    fn a_bad_url_never_echoes_a_credential() {
        // Passwords with characters that end the authority early (`/`, `?`)
        // spill into what would be the endpoints, path or options.
        for url in [
            "etcd://app:Xq/Zk@a:2379",
            "etcd://app:Xq?Zk@a:2379",
            "etcd://app:12/Zk@a:2379",
            "etcd://app:Xq:99/Zk@a:2379",
            "etcd://app:12?Zk@a:2379",
            "etcds://app:Xq/Zk@a:2379?ca=/ca.pem",
        ] {
            let err = parse_url(url).unwrap_err().to_string();
            assert!(
                !err.contains("Xq") && !err.contains("Zk") && !err.contains("12"),
                "{url}: {err}"
            );
            assert!(err.starts_with("invalid etcd URL"), "{url}: {err}");
            assert!(!err.contains('\n'), "{url}: {err}");
        }
        // Parts clear of the credentials are still named.
        let err = parse_url("etcd://app:s3cret@a:2379?bogus=1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown option `bogus`") && !err.contains("s3cret"),
            "{err}"
        );
        let err = parse_url("etcd://host").unwrap_err().to_string();
        assert!(err.contains("`host` is not host:port"), "{err}");
    }

    #[test]
    fn tls_settings() {
        let e = parse_url("etcds://a:2379?ca=/ca.pem&cert=/c.pem&key=/k.pem&domain=etcd.internal")
            .unwrap();
        let tls = e.tls.unwrap();
        assert_eq!(tls.ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            tls.identity,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        assert_eq!(tls.domain.as_deref(), Some("etcd.internal"));
    }

    #[test]
    fn durations_take_a_unit_and_escapes_must_be_whole() {
        let e = parse_url("etcd://a:2379?ttl=2m&keepalive=1500ms&start_timeout=1m").unwrap();
        assert_eq!(e.ttl, Duration::from_secs(120));
        assert_eq!(e.keepalive, Some(Duration::from_millis(1_500)));
        assert_eq!(Backend::start_timeout(&e), Some(Duration::from_secs(60)));
        // The old name of start_timeout still works.
        let old = parse_url("etcd://a:2379?connect_timeout=3s").unwrap();
        assert_eq!(Backend::start_timeout(&old), Some(Duration::from_secs(3)));
        assert_eq!(
            Backend::start_timeout(&parse_url("etcd://a:2379").unwrap()),
            None
        );
        // A bare number is not silently seconds.
        let err = parse_url("etcd://a:2379?ttl=7").unwrap_err().to_string();
        assert!(
            err.contains("`ttl`") && err.contains("add a unit, like `7s`"),
            "{err}"
        );
        let err = parse_url("etcd://a:2379?start_timeout=20m")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("start_timeout") && err.contains("between 100ms and 10m"),
            "{err}"
        );
        // Escapes decode; a broken one is an error that quotes nothing.
        let e = parse_url("etcd://app:p%40ss%3Aw@a:2379?namespace=a%2Fb").unwrap();
        assert_eq!(e.user.as_ref().map(|(_, p)| p.expose()), Some("p@ss:w"));
        assert_eq!(e.namespace, "a/b");
        for url in [
            "etcd://app:Xq100%@a:2379",
            "etcd://a:2379?user=app&password=Xq%zz",
        ] {
            let err = parse_url(url).unwrap_err().to_string();
            assert!(
                err.contains("password") && err.contains("`%`"),
                "{url}: {err}"
            );
            assert!(!err.contains("Xq"), "{url}: {err}");
        }
    }
}
