//! Checks of the `prefer` and `avoid` lists: each entry must be something a
//! node name or label can be (the runtime applies the same rule), and no
//! entry may be named twice.

use crate::ast::{Errors, WithSpan};

/// Longest node name or label in bytes; the runtime enforces the same limit.
const MAX_NAME_LEN: usize = 200;

/// The checked lists, or `None` after an error (recorded in `errors`).
pub(crate) fn check(
    prefer: Option<WithSpan<Vec<WithSpan<String>>>>,
    avoid: Option<WithSpan<Vec<WithSpan<String>>>>,
    errors: &mut Errors,
) -> Option<(Vec<String>, Vec<String>)> {
    let before = errors.len();
    let mut seen: Vec<(&'static str, String)> = Vec::new();
    let mut lists = [Vec::new(), Vec::new()];
    for ((key, list), out) in [("prefer", prefer), ("avoid", avoid)]
        .into_iter()
        .zip(lists.iter_mut())
    {
        let Some(list) = list else { continue };
        if list.value.is_empty() {
            errors.push(
                list.span,
                format_args!(
                    "`{key}` is empty: name at least one node or label, like `{key} = [\"node-a\"]`, or leave the key out"
                ),
            );
        }
        for entry in list.value {
            if let Some(why) = bad_name(&entry.value) {
                errors.push(
                    entry.span,
                    format_args!(
                        "`{key}` entry {} cannot name a node: {why}",
                        shown(&entry.value)
                    ),
                );
                continue;
            }
            match seen.iter().find(|(_, e)| *e == entry.value) {
                Some((first, _)) if *first == key => errors.push(
                    entry.span,
                    format_args!("`{}` is named twice in `{key}`", entry.value),
                ),
                Some((first, _)) => errors.push(
                    entry.span,
                    format_args!(
                        "`{}` is in both `{first}` and `{key}`: a node is either preferred or avoided",
                        entry.value
                    ),
                ),
                None => {
                    seen.push((key, entry.value.clone()));
                    out.push(entry.value);
                }
            }
        }
    }
    let [prefer, avoid] = lists;
    (errors.len() == before).then_some((prefer, avoid))
}

/// An entry quoted for a message, cut after 40 characters.
fn shown(entry: &str) -> String {
    if entry.chars().count() <= 60 {
        format!("{entry:?}")
    } else {
        format!("\"{}…\"", entry.chars().take(40).collect::<String>())
    }
}

/// Why `name` cannot be a node name or label, if it cannot.
fn bad_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some(
            "it is empty; write a node name like \"node-a\" or a label like \"zone=eu\"".into(),
        );
    }
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "it is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    name.chars().find(|c| !c.is_ascii_graphic()).map(|c| {
        format!("it contains {c:?}; node names and labels use only visible ASCII characters")
    })
}
