//! A secret (password, cluster cookie) that never shows in `Debug` or
//! `Display`, so a stray `{:?}` of a settings struct cannot print it.

use std::fmt;

/// A secret string: [`Secret::expose`] is the one way to read it, so every
/// place that does is easy to find. `Debug` and `Display` print `***`
/// whatever it holds (an empty secret too: the output never tells whether
/// one is set).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    /// Keeps `value` secret.
    pub(crate) fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the code that must send or check it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn debug_and_display_never_show_it() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Settings {
            user: String,
            password: Secret,
            maybe: Option<Secret>,
        }
        for value in ["hunter2", "", "***", "a\"b", "ü€"] {
            let secret = Secret::new(value);
            assert_eq!(format!("{secret}"), "***");
            assert_eq!(format!("{secret:?}"), "***");
            assert_eq!(format!("{secret:#?}"), "***");
            assert_eq!(format!("{secret:>20}"), "***");
            let settings = Settings {
                user: "app".into(),
                password: secret.clone(),
                maybe: Some(secret.clone()),
            };
            let shown = format!("{settings:?} {settings:#?}");
            if !value.is_empty() && value != "***" {
                assert!(!shown.contains(value), "{shown}");
            }
            assert_eq!(secret.expose(), value);
            assert_eq!(secret.is_empty(), value.is_empty());
        }
    }
}
