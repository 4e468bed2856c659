//! Durations in the attribute (`shutdown = "5s"`, `period = "1m"`): the
//! grammar and messages of the runtime's URL options.
//!
//! The same small wrapper over the same grammar (the `humantime` crate's)
//! lives in the runtime crate (`highlander/src/backend/kit/duration.rs`),
//! which this proc-macro crate cannot call; a test there compiles this file
//! too and checks that both give the same answer for the same input. Keep
//! the two in step.

use std::time::Duration;

/// The examples every message shows.
pub(crate) const EXAMPLES: &str = "250ms, 3s, 2m or 1h";

/// Longest piece of a value that a message quotes.
const SHOWN: usize = 40;

/// Reads `text` (surrounding whitespace ignored) as a duration; a bare
/// number is an error that says to add a unit.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let shown = cut(text);
    if is_bare_number(text) {
        return Err(format!(
            "`{shown}` has no unit: add one, like `{shown}s` or `{shown}ms` (durations look like {EXAMPLES})"
        ));
    }
    humantime::parse_duration(text).map_err(|e| match e {
        humantime::DurationError::Empty => {
            format!("the duration is empty: write one like {EXAMPLES}")
        }
        humantime::DurationError::NumberOverflow => {
            format!("`{shown}` is too large a duration (durations look like {EXAMPLES})")
        }
        humantime::DurationError::UnknownUnit { unit, .. } if !unit.is_empty() => format!(
            "`{shown}` is not a duration like {EXAMPLES} (unknown unit `{}`)",
            cut(&unit)
        ),
        _ => format!("`{shown}` is not a duration like {EXAMPLES}"),
    })
}

/// Digits, with at most one `.` among them: a number without a unit.
fn is_bare_number(text: &str) -> bool {
    text.bytes().any(|b| b.is_ascii_digit())
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|&b| b == b'.').count() <= 1
}

/// `text` cut to [`SHOWN`] characters, for quoting in a message.
fn cut(text: &str) -> String {
    text.chars().take(SHOWN).collect()
}
