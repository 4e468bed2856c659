//! Checks: the parsed attribute and the item it is on, every error with a span.

use proc_macro2::Span;
use syn::spanned::Spanned;

use crate::ast::{Args, Errors};

/// Longest id in bytes; the runtime enforces the same limit.
pub(crate) const MAX_ID_LEN: usize = 200;

/// Validated settings, ready to expand.
pub(crate) struct Checked {
    pub(crate) id: String,
    pub(crate) restart: &'static str,
    pub(crate) shutdown_ms: u64,
    pub(crate) intensity: u32,
    pub(crate) period_ms: u64,
    pub(crate) prefer: Vec<String>,
    pub(crate) avoid: Vec<String>,
    pub(crate) init: Option<syn::Path>,
    pub(crate) krate: syn::Path,
}

/// The item the attribute is on: a non-generic struct or enum.
pub(crate) struct Target {
    pub(crate) ident: syn::Ident,
}

pub(crate) fn check_args(args: Args, errors: &mut Errors) -> Option<Checked> {
    let id = match args.id {
        None if args.id_written => None,
        None => {
            errors.push(
                Span::call_site(),
                "missing `id`: name the singleton, like #[highlander(id = \"invoice-sweeper\")]",
            );
            None
        }
        Some(id) => check_id(&id.value, id.span, errors).then_some(id.value),
    };
    let restart = match args.restart {
        None => Some("Permanent"),
        Some(r) => match r.value.as_str() {
            "permanent" => Some("Permanent"),
            "transient" => Some("Transient"),
            "temporary" => Some("Temporary"),
            other => {
                errors.push(
                    r.span,
                    format_args!(
                        "unknown restart policy `{other}`: expected \"permanent\", \"transient\" or \"temporary\""
                    ),
                );
                None
            }
        },
    };
    let shutdown_ms = duration(args.shutdown, "shutdown", 5_000, errors);
    let period_ms = duration(args.period, "period", 5_000, errors);
    let intensity = args.intensity.map(|i| i.value).unwrap_or(3);
    let affinity = crate::affinity::check(args.prefer, args.avoid, errors);
    let krate = args
        .krate
        .unwrap_or_else(|| syn::parse_quote!(::highlander));
    let (prefer, avoid) = affinity?;
    Some(Checked {
        id: id?,
        restart: restart?,
        shutdown_ms: shutdown_ms?,
        intensity,
        period_ms: period_ms?,
        prefer,
        avoid,
        init: args.init,
        krate,
    })
}

fn check_id(id: &str, span: Span, errors: &mut Errors) -> bool {
    if id.is_empty() {
        errors.push(span, "`id` must not be empty");
        return false;
    }
    if id.len() > MAX_ID_LEN {
        errors.push(
            span,
            format_args!("`id` is {} bytes long; the limit is {MAX_ID_LEN}", id.len()),
        );
        return false;
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._:/-".contains(*c)))
    {
        errors.push(
            span,
            format_args!("`id` contains {bad:?}: use only A-Z a-z 0-9 and . _ : / -"),
        );
        return false;
    }
    true
}

fn duration(
    value: Option<crate::ast::WithSpan<String>>,
    key: &str,
    default_ms: u64,
    errors: &mut Errors,
) -> Option<u64> {
    let Some(value) = value else {
        return Some(default_ms);
    };
    match parse_duration_ms(&value.value) {
        Some(ms) => Some(ms),
        None => {
            errors.push(
                value.span,
                format_args!(
                    "cannot read `{}` as a duration for `{key}`: write a whole number and a unit, like \"500ms\", \"5s\", \"2m\" or \"1h\"",
                    value.value
                ),
            );
            None
        }
    }
}

/// `"500ms"`, `"5s"`, `"2m"`, `"1h"` to milliseconds.
pub(crate) fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let number: u64 = text[..digits].parse().ok()?;
    let factor = match text[digits..].trim_start() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

pub(crate) fn check_item(item: &syn::Item, errors: &mut Errors) -> Option<Target> {
    let (ident, generics) = match item {
        syn::Item::Struct(s) => (&s.ident, &s.generics),
        syn::Item::Enum(e) => (&e.ident, &e.generics),
        other => {
            errors.push(
                item_keyword_span(other),
                "#[highlander] goes on a struct or an enum: the type whose instances run as the singleton",
            );
            return None;
        }
    };
    if !generics.params.is_empty() || generics.where_clause.is_some() {
        errors.push(
            generics.span(),
            "#[highlander] cannot be used on a generic type: a registered singleton needs one concrete type; \
             wrap the concrete instantiation in a struct of its own",
        );
        return None;
    }
    Some(Target {
        ident: ident.clone(),
    })
}

fn item_keyword_span(item: &syn::Item) -> Span {
    match item {
        syn::Item::Fn(f) => f.sig.fn_token.span,
        syn::Item::Union(u) => u.union_token.span,
        syn::Item::Trait(t) => t.trait_token.span,
        syn::Item::Impl(i) => i.impl_token.span,
        syn::Item::Mod(m) => m.mod_token.span,
        syn::Item::Const(c) => c.const_token.span,
        syn::Item::Static(s) => s.static_token.span,
        syn::Item::Type(t) => t.type_token.span,
        syn::Item::Use(u) => u.use_token.span,
        other => other.span(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("5s"), Some(5_000));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
        assert_eq!(parse_duration_ms("0s"), Some(0));
        assert_eq!(parse_duration_ms("5"), None);
        assert_eq!(parse_duration_ms("s"), None);
        assert_eq!(parse_duration_ms("1.5s"), None);
        assert_eq!(parse_duration_ms("5 days"), None);
        assert_eq!(parse_duration_ms("99999999999999999999h"), None);
    }
}
