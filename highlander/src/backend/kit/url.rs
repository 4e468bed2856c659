//! URLs: percent-decoding for option values, and the redaction of
//! credentials that every message and log line goes through.

/// Decodes the `%XX` escapes of a URL option value, strictly: every `%`
/// must be followed by two hex digits, and the result must be UTF-8. A `+`
/// stays a `+` (it is a space only in HTML forms, and base64 passwords hold
/// it). The error says what is wrong, never quoting the value (it may be a
/// password).
pub(crate) fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                return Err("a `%` escape is cut short: write `%25` for a literal `%`".to_string());
            };
            let (Some(hi), Some(lo)) = (hex_digit(hi), hex_digit(lo)) else {
                return Err(
                    "a `%` escape is not two hex digits: write `%25` for a literal `%`".to_string(),
                );
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a `%` escape does not decode to UTF-8 text".to_string())
}

/// Returns `url` with every credential replaced by `***` (the body of
/// [`crate::redact_url`], whose docs say what is hidden).
pub(crate) fn redact_url(url: &str) -> String {
    let Some((hidden, empty_secret)) = mask(url) else {
        return if is_word(url) {
            url.to_string()
        } else {
            "***".to_string()
        };
    };
    let mut out = String::with_capacity(url.len());
    let mut in_run = false;
    for (pos, ch) in url.char_indices() {
        if empty_secret[pos] && !in_run {
            out.push_str("***");
            in_run = true;
        }
        if hidden[pos] {
            if !in_run {
                out.push_str("***");
                in_run = true;
            }
        } else {
            out.push(ch);
            in_run = false;
        }
    }
    if empty_secret[url.len()] && !in_run {
        out.push_str("***");
    }
    out
}

/// The parts of `url` that [`redact_url`] hides, each run whole (the whole
/// value when it is neither a URL nor a single word).
pub(crate) fn secrets(url: &str) -> Vec<&str> {
    let Some((hidden, _)) = mask(url) else {
        return if is_word(url) { Vec::new() } else { vec![url] };
    };
    let mut runs = Vec::new();
    let mut start = None;
    let ends = url.char_indices().map(|(pos, _)| pos).chain([url.len()]);
    for pos in ends {
        match (start, pos < url.len() && hidden[pos]) {
            (None, true) => start = Some(pos),
            (Some(s), false) => {
                runs.push(&url[s..pos]);
                start = None;
            }
            _ => {}
        }
    }
    runs
}

/// Which bytes of `url` are secret (each run prints as `***`), and where an
/// empty secret sits (it prints as `***` too, so the output never tells
/// whether or how a secret was set). `None` when `url` has no `://`; all of
/// it is secret when what precedes `://` is not a scheme.
fn mask(url: &str) -> Option<(Vec<bool>, Vec<bool>)> {
    let scheme_end = url.find("://")?;
    let bytes = url.as_bytes();
    let mut hidden = vec![false; bytes.len()];
    let mut empty_secret = vec![false; bytes.len() + 1];
    if !is_scheme(&url[..scheme_end]) {
        hidden.fill(true);
        empty_secret[0] = true;
        return Some((hidden, empty_secret));
    }
    let after = scheme_end + 3;

    // The userinfo: up to the last `@` anywhere after `scheme://`.
    if let Some(at) = url[after..].rfind('@').map(|i| after + i) {
        let userinfo = &url[after..at];
        let user_end = userinfo.find(':').map_or(at, |i| after + i);
        if !is_plain_user(&url[after..user_end]) {
            hidden[after..user_end].fill(true);
        }
        if user_end < at {
            // The `:` stays visible; the password is hidden.
            hidden[user_end + 1..at].fill(true);
            empty_secret[at] = true;
        }
    }

    // Secret parameters, wherever a `?`, `&`, `;` or `#` starts one (also
    // inside what the userinfo rule took: drivers differ on where it ends).
    let mut i = after;
    while i < bytes.len() {
        if matches!(bytes[i], b'?' | b'&' | b';' | b'#') {
            let key_start = i + 1;
            let key_end = url[key_start..]
                .find(['=', '&', ';', '#'])
                .map_or(bytes.len(), |j| key_start + j);
            if key_end < bytes.len()
                && bytes[key_end] == b'='
                && is_secret_key(&url[key_start..key_end])
            {
                let value_start = key_end + 1;
                let value_end = url[value_start..]
                    .find(['&', ';', '#'])
                    .map_or(bytes.len(), |j| value_start + j);
                hidden[value_start..value_end].fill(true);
                empty_secret[value_end] = true;
                i = value_end;
                continue;
            }
        }
        i += 1;
    }
    Some((hidden, empty_secret))
}

/// `scheme` as RFC 3986 spells it: a letter, then letters, digits, `+ - .`.
fn is_scheme(scheme: &str) -> bool {
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A bare word such as `memory`: safe to show.
fn is_word(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_'))
}

/// A user name that is only a user name: nothing a parser could take for the
/// start of a path, query, fragment or parameter.
fn is_plain_user(user: &str) -> bool {
    user.chars().all(|c| {
        !c.is_whitespace()
            && !c.is_control()
            && !matches!(c, '/' | '?' | '#' | '&' | ';' | '=' | '@' | '\\')
    })
}

/// Whether a parameter name looks like it holds a credential, after
/// percent-decoding it (drivers decode names too: `pass%77ord` is `password`).
fn is_secret_key(key: &str) -> bool {
    let key = decode_lenient(key).trim().to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "cookie",
        "credential",
        "auth",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// Lenient decoding, for redaction only: a `%` not followed by two hex
/// digits is kept as it is, and bytes that are not UTF-8 become U+FFFD.
/// The strict [`percent_decode`] would refuse such a name, and redaction
/// cannot refuse: it must still see `pass%77ord%zz` as a password, as a
/// lenient driver might.
fn decode_lenient(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let digits = bytes
                .get(i + 1..i + 3)
                .and_then(|h| Some((hex_digit(h[0])?, hex_digit(h[1])?)));
            if let Some((hi, lo)) = digits {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(input, expected output)`: every secret gone, everything else kept.
    const CASES: &[(&str, &str)] = &[
        (
            "postgres://app:s3cret@db:5432/x",
            "postgres://app:***@db:5432/x",
        ),
        // base64 passwords hold `/` and `+`; others `?`, `#`, `:` or `@`
        ("postgres://app:ab/cd@db/app", "postgres://app:***@db/app"),
        ("postgres://app:ab?cd@db/app", "postgres://app:***@db/app"),
        ("postgres://app:ab#cd@db/app", "postgres://app:***@db/app"),
        ("postgres://app:a:b:c@db/app", "postgres://app:***@db/app"),
        ("postgres://app:p@ss@db/app", "postgres://app:***@db/app"),
        ("postgres://app:Zm9v/YmFy+cQ==@db", "postgres://app:***@db"),
        ("postgres://app:@db/app", "postgres://app:***@db/app"),
        ("postgres://:s3cret@db", "postgres://:***@db"),
        ("postgres://app@db/app", "postgres://app@db/app"),
        (
            "etcds://root:pw@a:2379,b:2379",
            "etcds://root:***@a:2379,b:2379",
        ),
        ("etcd://a:2379,b:2379", "etcd://a:2379,b:2379"),
        (
            "cluster://0.0.0.0:7400?seeds=a:7400",
            "cluster://0.0.0.0:7400?seeds=a:7400",
        ),
        (
            "cluster://0.0.0.0:7400?cookie=abc&seeds=a:1",
            "cluster://0.0.0.0:7400?cookie=***&seeds=a:1",
        ),
        (
            "postgres://db/x?user=a&password=s3cret&sslmode=require",
            "postgres://db/x?user=a&password=***&sslmode=require",
        ),
        ("postgres://db/x?password=", "postgres://db/x?password=***"),
        (
            "postgres://db/x?PassWord=s3cret",
            "postgres://db/x?PassWord=***",
        ),
        (
            "postgres://db/x?pass%77ord=s3cret",
            "postgres://db/x?pass%77ord=***",
        ),
        (
            "postgres://db/x?sslpassword=s3cret;a=b",
            "postgres://db/x?sslpassword=***;a=b",
        ),
        (
            "postgres://db/x#password=s3cret",
            "postgres://db/x#password=***",
        ),
        // a password holding `@` in the query: the userinfo rule and the
        // parameter rule together hide all of it
        ("postgres://db/x?password=ab@cd", "postgres://***"),
        // a user name that is really a path and query
        ("postgres://db/x?password=s3cret&u=a@b", "postgres://***@b"),
        (
            "postgres://app:pw@db/x?application_name=me@corp",
            "postgres://app:***@corp",
        ),
        // both at once
        (
            "postgres://u:one@db/x?password=two",
            "postgres://u:***@db/x?password=***",
        ),
        // not URLs: shown only when they are a single word
        ("memory", "memory"),
        ("mem", "mem"),
        ("host=db password=s3cret", "***"),
        ("app:s3cret@db", "***"),
        ("bad scheme://u:s3cret@db", "***"),
        ("://u:s3cret@db", "***"),
        ("", "***"),
        // non-ASCII survives intact
        ("postgres://ü:pä/ss@dö/ñ", "postgres://ü:***@dö/ñ"),
    ];

    #[test]
    fn every_secret_is_hidden() {
        for (input, expected) in CASES {
            assert_eq!(redact_url(input), *expected, "input {input:?}");
        }
    }

    #[test]
    fn the_output_does_not_depend_on_the_password() {
        let passwords = [
            "",
            "s3cret",
            "ab/cd",
            "a?b",
            "a#b",
            "a:b",
            "p@ss",
            "@",
            "@@",
            "%40",
            "x?password=y&z=1",
            "//",
            "ü€",
            "a b",
            "\n",
        ];
        let shapes = [
            ("postgres://", "app", "@db:5432/x?sslmode=require"),
            ("etcds://", "root", "@a:2379,b:2379"),
            ("cluster://", "", "@0.0.0.0:7400?seeds=a:1"),
            ("x://", "u", "@h/p?q=1@2#frag"),
            ("x://", "weird/user?", "@h"),
        ];
        for (scheme, user, rest) in shapes {
            let reference = redact_url(&format!("{scheme}{user}:zzz{rest}"));
            for password in passwords {
                let url = format!("{scheme}{user}:{password}{rest}");
                assert_eq!(redact_url(&url), reference, "url {url:?}");
            }
        }
    }

    #[test]
    fn percent_decode_is_strict() {
        assert_eq!(percent_decode("a%20b").as_deref(), Ok("a b"));
        assert_eq!(percent_decode("p%40ss%2Fw%2bd").as_deref(), Ok("p@ss/w+d"));
        assert_eq!(percent_decode("a+b").as_deref(), Ok("a+b"));
        assert_eq!(percent_decode("%C3%BC").as_deref(), Ok("ü"));
        assert_eq!(percent_decode("").as_deref(), Ok(""));
        for bad in ["%", "%4", "a%zz", "%+1", "%-1", "% 1", "%ü1", "%C3", "%FF"] {
            let e = percent_decode(bad).unwrap_err();
            assert!(e.starts_with("a `%` escape"), "{bad:?}: {e}");
        }
    }

    /// Redaction decodes names leniently: an escape that a strict decoder
    /// refuses does not make a secret parameter look harmless.
    #[test]
    fn redaction_reads_names_leniently() {
        assert_eq!(
            redact_url("postgres://db/x?pass%77ord%zz=s3cret"),
            "postgres://db/x?pass%77ord%zz=***"
        );
    }
}
