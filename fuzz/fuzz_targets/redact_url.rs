//! `redact_url` on any input: never panics, and no character of a password
//! ever shows, neither of the userinfo's password nor of a secret query
//! parameter's value.
//!
//! Input: `scheme \0 user \0 password \0 rest` (missing parts are empty).
//! The password's characters are moved into the private-use plane
//! (U+E000..U+EFFF), which is stripped from the other parts, so any such
//! character in the output is a leak. The characters that give a URL its
//! structure (`: @ / ? # & ; = %`) are kept, so the fuzzer still explores
//! passwords that hold them.

#![no_main]

use highlander::redact_url;
use libfuzzer_sys::fuzz_target;

const STRUCTURE: &[char] = &[':', '@', '/', '?', '#', '&', ';', '=', '%'];

fn is_marker(c: char) -> bool {
    ('\u{E000}'..='\u{EFFF}').contains(&c)
}

fn secret(text: &str) -> String {
    text.chars()
        .map(|c| {
            if STRUCTURE.contains(&c) {
                c
            } else {
                char::from_u32(0xE000 + (c as u32 % 0x1000)).unwrap_or('\u{E000}')
            }
        })
        .collect()
}

fn public(text: &str) -> String {
    text.chars().filter(|c| !is_marker(*c)).collect()
}

fn check(url: &str) {
    let out = redact_url(url);
    assert!(!out.contains(is_marker), "a password shows: {url:?} -> {out:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = redact_url(text);
    let mut parts = text.splitn(4, '\0');
    let mut part = || public(parts.next().unwrap_or(""));
    let (scheme, user, password, rest) = (part(), part(), secret(&part()), part());

    // The userinfo's password: every parser ends the user at its first `:`,
    // so a user without `:` or `@` has the password after it.
    if !user.contains([':', '@']) {
        check(&format!("{scheme}://{user}:{password}@{rest}"));
    }

    // A secret parameter's value, which ends at the next `&`, `;` or `#`.
    let value: String = password.chars().filter(|c| !matches!(c, '&' | ';' | '#')).collect();
    for key in ["password", "sslpassword", "cookie", "PassWord", "pass%77ord"] {
        check(&format!("{scheme}://{user}?{key}={value}&{rest}"));
        check(&format!("{scheme}://{user}?a=b;{key}={value}#{rest}"));
    }
});
