//! `backend::from_url` for every scheme: never panics, and its errors never
//! show the password, nor any piece of it (between `/ ? # @ : & ; =`) of 4
//! characters or more: `from_url` hides every run of 4 or more characters of
//! a secret that a backend's message quotes.
//!
//! Input: one byte choosing the scheme, then `user \0 password \0 rest`.

#![no_main]

use highlander::backend::from_url;
use libfuzzer_sys::fuzz_target;

const SCHEMES: &[&str] = &[
    "postgres://",
    "postgresql://",
    "etcd://",
    "etcds://",
    "cluster://",
    "memory://",
    "redis://",
    "",
];

fn error_of(url: &str) -> Option<String> {
    from_url(url).err().map(|e| e.to_string())
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let scheme = SCHEMES[pick as usize % SCHEMES.len()];
    // Any text at all, as given.
    let _ = from_url(&format!("{scheme}{text}"));

    let mut parts = text.splitn(3, '\0');
    let (user, password, rest) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    if user.contains([':', '@']) {
        return;
    }
    let public = format!("{scheme}{user}:@{rest}");
    let Some(error) = error_of(&format!("{scheme}{user}:{password}@{rest}")) else {
        return;
    };
    // What the messages say with a harmless password: text that appears
    // there is template or URL text, not a leak.
    let neutral = error_of(&format!("{scheme}{user}:x@{rest}")).unwrap_or_default();
    let also_query = error_of(&format!("{scheme}{rest}?password={password}")).unwrap_or_default();
    let query_neutral = error_of(&format!("{scheme}{rest}?password=x")).unwrap_or_default();
    let pieces = std::iter::once(password).chain(password.split(['/', '?', '#', '@', ':', '&', ';', '=']));
    for piece in pieces {
        let piece = piece.trim();
        // `*` is what hidden text becomes: a piece holding it cannot be told
        // apart from the redaction marker.
        if piece.chars().count() < 4 || public.contains(piece) || piece.contains('*') {
            continue;
        }
        if !neutral.contains(piece) {
            assert!(!error.contains(piece), "`{piece}` of the password in: {error}");
        }
        if !query_neutral.contains(piece) && !password.contains(['&', ';', '#', '@']) {
            assert!(!also_query.contains(piece), "`{piece}` of the password in: {also_query}");
        }
    }
});
