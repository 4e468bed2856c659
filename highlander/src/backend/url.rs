//! [`from_url`]: the backend a URL names, with one clear error for a
//! scheme whose feature is off or a value that is no URL.

use std::collections::HashSet;

#[cfg(feature = "cluster")]
use super::cluster;
#[cfg(feature = "etcd")]
use super::etcd;
#[cfg(feature = "postgres")]
use super::postgres;
use super::{Backend, MemoryCluster, kit};
use crate::{Error, Result, redact_url};

/// `memory`, `postgres://…`, `etcd://…` or `cluster://…`.
///
/// A scheme whose cargo feature is not enabled is an error that names the
/// feature to enable.
///
/// ```
/// let memory = highlander::backend::from_url("memory").unwrap();
/// assert_eq!(memory.describe(), "memory");
/// let err = highlander::backend::from_url("redis://:hunter2@cache:6379").err().unwrap();
/// assert_eq!(
///     err.to_string(),
///     "unknown backend scheme `redis://`: use memory, postgres://…, etcd://… or cluster://…"
/// );
/// let err = highlander::backend::from_url("host=db password=hunter2").err().unwrap();
/// assert!(!err.to_string().contains("hunter2"));
/// ```
pub fn from_url(url: &str) -> Result<Box<dyn Backend>> {
    let url = url.trim();
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or(url);
    let parsed = match scheme {
        "memory" | "mem" => return Ok(Box::new(MemoryCluster::global())),
        "postgres" | "postgresql" => postgres_from_url(url),
        "etcd" | "etcds" => etcd_from_url(url),
        "cluster" => cluster_from_url(url),
        _ => return Err(unknown_backend(url)),
    };
    parsed.map_err(|e| scrub(e, url))
}

/// Defence in depth for the backends' own messages: any run of 4 or more
/// characters of a secret of `url` (what [`redact_url`] hides) that a message
/// quotes is replaced by `***`, say from a parser that ended the authority at
/// a `?` inside the password and quoted the "host" it found, or quoted a
/// parameter whose value swallowed a `password=`.
fn scrub(error: Error, url: &str) -> Error {
    const N: usize = 4;
    let secret: HashSet<&str> = kit::url::secrets(url)
        .into_iter()
        .flat_map(|run| windows(run, N))
        .collect();
    if secret.is_empty() {
        return error;
    }
    let hide = |message: String| {
        let starts: Vec<usize> = message
            .char_indices()
            .map(|(i, _)| i)
            .chain([message.len()])
            .collect();
        let mut hidden = vec![false; starts.len()];
        for k in 0..starts.len().saturating_sub(N) {
            if secret.contains(&message[starts[k]..starts[k + N]]) {
                hidden[k..k + N].fill(true);
            }
        }
        let mut out = String::with_capacity(message.len());
        for (k, ch) in message.chars().enumerate() {
            if !hidden[k] {
                out.push(ch);
            } else if k == 0 || !hidden[k - 1] {
                out.push_str("***");
            }
        }
        out
    };
    // A kept source is shown by reporters that walk the chain: keep it only
    // when no error in it quotes a piece of a secret.
    let clean = |source: Option<Box<dyn std::error::Error + Send + Sync>>| {
        source.filter(|source| {
            let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**source);
            while let Some(e) = next {
                let text = e.to_string();
                if hide(text.clone()) != text {
                    return false;
                }
                next = e.source();
            }
            true
        })
    };
    match error {
        Error::Config { message, source } => Error::Config {
            message: hide(message),
            source: clean(source),
        },
        Error::Backend {
            kind,
            message,
            source,
        } => Error::Backend {
            kind,
            message: hide(message),
            source: clean(source),
        },
        other => other,
    }
}

/// Every run of `n` characters of `text`.
fn windows(text: &str, n: usize) -> impl Iterator<Item = &str> {
    let starts: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    (0..starts.len().saturating_sub(n)).map(move |k| &text[starts[k]..starts[k + n]])
}

/// The error for a URL no backend takes. It names the scheme only when the
/// value has one that is spelled like a scheme; the rest of the value (which
/// may hold a password in any shape) is never echoed.
fn unknown_backend(url: &str) -> Error {
    const USE: &str = "use memory, postgres://…, etcd://… or cluster://…";
    let scheme = url.split_once("://").map(|(s, _)| s);
    let plain = |s: &str| {
        (1..=32).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    };
    Error::config(match scheme {
        Some(s) if plain(s) => format!("unknown backend scheme `{s}://`: {USE}"),
        _ => format!(
            "the backend is not a URL this crate knows (the value is not shown, it may hold a password): {USE}"
        ),
    })
}

#[cfg(feature = "postgres")]
fn postgres_from_url(url: &str) -> Result<Box<dyn Backend>> {
    postgres::from_url(url)
}

#[cfg(feature = "etcd")]
fn etcd_from_url(url: &str) -> Result<Box<dyn Backend>> {
    etcd::from_url(url)
}

#[cfg(feature = "cluster")]
fn cluster_from_url(url: &str) -> Result<Box<dyn Backend>> {
    cluster::from_url(url)
}

#[cfg(not(feature = "postgres"))]
fn postgres_from_url(url: &str) -> Result<Box<dyn Backend>> {
    missing_feature(url, "postgres")
}

#[cfg(not(feature = "etcd"))]
fn etcd_from_url(url: &str) -> Result<Box<dyn Backend>> {
    missing_feature(url, "etcd")
}

#[cfg(not(feature = "cluster"))]
fn cluster_from_url(url: &str) -> Result<Box<dyn Backend>> {
    missing_feature(url, "cluster")
}

#[allow(dead_code)]
fn missing_feature(url: &str, feature: &str) -> Result<Box<dyn Backend>> {
    Err(Error::config(format!(
        "backend `{}` needs the `{feature}` feature of highlander: \
         enable it with `highlander = {{ version = \"0.1\", features = [\"{feature}\"] }}` in Cargo.toml",
        redact_url(url)
    )))
}
