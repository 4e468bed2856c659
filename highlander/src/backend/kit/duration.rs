//! Durations as URL options and the `#[highlander]` attribute write them:
//! one grammar, the [`humantime`] crate's (`250ms`, `3s`, `2m`, `1h`,
//! `1h 30m`, `1.5s`), with one rule of ours on top: a bare number is an
//! error, never silently seconds or milliseconds.
//!
//! The attribute's crate (`highlander-macros`) cannot call into this one,
//! so `highlander-macros/src/duration.rs` holds the same small wrapper over
//! the same grammar; a test here runs both on the same inputs.

use std::ops::RangeInclusive;
use std::time::Duration;

/// The examples every message shows.
pub(crate) const EXAMPLES: &str = "250ms, 3s, 2m or 1h";

/// Longest piece of a value that a message quotes.
const SHOWN: usize = 40;

/// Reads `text` (surrounding whitespace ignored) as a duration. The error
/// is one line that quotes the value (cut to 40 characters) and shows
/// examples; for a bare number it says to add a unit.
///
/// No credential ever reaches here: callers pass option values, never a
/// whole URL.
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

/// Reads the value of URL option `option` as a duration within `range`.
/// The error names the option and the range:
/// "`ttl` must be a duration between 2s and 1h (like 250ms, 3s or 2m), not `5`: add a unit, like `5s`".
pub(crate) fn ranged(
    option: &str,
    value: &str,
    range: RangeInclusive<Duration>,
) -> Result<Duration, String> {
    match parse(value) {
        Ok(d) if range.contains(&d) => Ok(d),
        _ => {
            let shown = cut(value);
            let mut message = format!(
                "`{option}` must be a duration between {} and {} (like 250ms, 3s or 2m), not `{shown}`",
                show(*range.start()),
                show(*range.end()),
            );
            if is_bare_number(value.trim()) {
                message.push_str(&format!(": add a unit, like `{}s`", cut(value.trim())));
            }
            Err(message)
        }
    }
}

/// `d` as an option would write it, in the largest unit that shows it
/// exactly: `250ms`, `3s`, `2m`, `1h`, `1500ms`, `0s`.
pub(crate) fn show(d: Duration) -> String {
    const UNITS: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    let (size, unit) = UNITS
        .iter()
        .find(|(size, _)| nanos.is_multiple_of(*size))
        .expect("every duration is a whole number of nanoseconds");
    format!("{}{unit}", nanos / size)
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

/// The attribute's copy of the wrapper, compiled here so a test checks it
/// agrees with this one.
#[cfg(test)]
#[allow(dead_code, unreachable_pub)]
#[path = "../../../../highlander-macros/src/duration.rs"]
mod attribute;

#[cfg(test)]
mod tests {
    use super::*;

    use super::attribute;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    const INPUTS: &[&str] = &[
        "250ms",
        "3s",
        "2m",
        "1h",
        "0s",
        "1h 30m",
        "1h30m",
        "1.5s",
        " 5s ",
        "90s",
        "2min",
        "1day",
        "5",
        "0",
        "1.5",
        "",
        "  ",
        "s",
        "5x",
        "5 sex",
        "-5s",
        "5s-",
        "1e3s",
        "..",
        "1..5s",
        "99999999999999999999999h",
        "५s",
        "5 s",
    ];

    #[test]
    fn the_grammar_is_humantime_and_never_a_bare_number() {
        assert_eq!(parse("250ms"), Ok(MS(250)));
        assert_eq!(parse("3s"), Ok(MS(3_000)));
        assert_eq!(parse("2m"), Ok(MS(120_000)));
        assert_eq!(parse("1h"), Ok(MS(3_600_000)));
        assert_eq!(parse("1h 30m"), Ok(MS(5_400_000)));
        assert_eq!(parse("1.5s"), Ok(MS(1_500)));
        assert_eq!(parse(" 5s "), Ok(MS(5_000)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        for bare in ["5", "0", "1.5", "250"] {
            let e = parse(bare).unwrap_err();
            assert!(e.contains("has no unit: add one"), "{bare}: {e}");
            assert!(e.contains(&format!("`{bare}s`")), "{bare}: {e}");
            assert!(e.contains(EXAMPLES), "{bare}: {e}");
        }
        for bad in ["", "s", "5x", "-5s", "1e3s", "99999999999999999999999h"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(EXAMPLES), "{bad:?}: {e}");
            assert!(!e.contains('\n'), "{bad:?}: {e}");
        }
        assert_eq!(
            parse("5x").unwrap_err(),
            "`5x` is not a duration like 250ms, 3s, 2m or 1h (unknown unit `x`)"
        );
    }

    #[test]
    fn messages_quote_at_most_40_characters() {
        let long = format!("{}x", "9".repeat(100));
        let e = parse(&long).unwrap_err();
        assert!(e.contains(&format!("`{}`", "9".repeat(40))), "{e}");
        assert!(!e.contains(&"9".repeat(41)), "{e}");
        let e = ranged("ttl", &"7".repeat(100), MS(1)..=MS(2)).unwrap_err();
        assert!(!e.contains(&"7".repeat(41)), "{e}");
    }

    #[test]
    fn ranged_names_the_option_and_the_range() {
        let range = MS(2_000)..=MS(3_600_000);
        assert_eq!(ranged("ttl", "10s", range.clone()), Ok(MS(10_000)));
        assert_eq!(ranged("ttl", "2s", range.clone()), Ok(MS(2_000)));
        assert_eq!(ranged("ttl", "1h", range.clone()), Ok(MS(3_600_000)));
        assert_eq!(
            ranged("ttl", "1s", range.clone()).unwrap_err(),
            "`ttl` must be a duration between 2s and 1h (like 250ms, 3s or 2m), not `1s`"
        );
        assert_eq!(
            ranged("ttl", "5", range.clone()).unwrap_err(),
            "`ttl` must be a duration between 2s and 1h (like 250ms, 3s or 2m), not `5`: add a unit, like `5s`"
        );
        assert_eq!(
            ranged("margin", "soon", Duration::ZERO..=MS(3_600_000)).unwrap_err(),
            "`margin` must be a duration between 0s and 1h (like 250ms, 3s or 2m), not `soon`"
        );
    }

    #[test]
    fn show_writes_what_parse_reads() {
        assert_eq!(show(Duration::ZERO), "0s");
        assert_eq!(show(MS(250)), "250ms");
        assert_eq!(show(MS(1_500)), "1500ms");
        assert_eq!(show(MS(3_000)), "3s");
        assert_eq!(show(MS(90_000)), "90s");
        assert_eq!(show(MS(120_000)), "2m");
        assert_eq!(show(MS(3_600_000)), "1h");
        assert_eq!(show(MS(86_400_000)), "24h");
        assert_eq!(show(Duration::from_micros(500)), "500us");
        assert_eq!(show(Duration::from_nanos(1_000_001)), "1000001ns");
        for d in [
            Duration::ZERO,
            Duration::from_nanos(7),
            Duration::from_micros(500),
            MS(250),
            MS(1_500),
            MS(90_000),
            MS(7_200_000),
            Duration::from_secs(86_400 * 365),
        ] {
            assert_eq!(parse(&show(d)), Ok(d), "{}", show(d));
        }
    }

    #[test]
    fn the_attribute_reads_durations_the_same_way() {
        for input in INPUTS {
            assert_eq!(attribute::parse(input), parse(input), "input {input:?}");
        }
    }
}
