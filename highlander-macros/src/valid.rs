//! Checks: the parsed attribute and the item it is on, every error with a span.

use std::time::Duration;

use proc_macro2::Span;
use syn::spanned::Spanned;

use crate::ast::{Args, Errors};

/// Longest id in bytes; the runtime enforces the same limit.
pub(crate) const MAX_ID_LEN: usize = 200;

/// Validated settings, ready to expand.
pub(crate) struct Checked {
    pub(crate) id: String,
    pub(crate) restart: &'static str,
    pub(crate) shutdown: Duration,
    pub(crate) intensity: u32,
    pub(crate) period: Duration,
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
    let shutdown = duration(args.shutdown, "shutdown", Duration::from_secs(5), errors);
    let period = duration(args.period, "period", Duration::from_secs(5), errors);
    let intensity = args.intensity.map(|i| i.value).unwrap_or(3);
    let krate = args
        .krate
        .unwrap_or_else(|| syn::parse_quote!(::highlander));
    Some(Checked {
        id: id?,
        restart: restart?,
        shutdown: shutdown?,
        intensity,
        period: period?,
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

/// A duration key's value, read as the runtime reads durations in backend
/// URLs (`crate::duration`).
fn duration(
    value: Option<crate::ast::WithSpan<String>>,
    key: &str,
    default: Duration,
    errors: &mut Errors,
) -> Option<Duration> {
    let Some(value) = value else {
        return Some(default);
    };
    match crate::duration::parse(&value.value) {
        Ok(d) => Some(d),
        Err(why) => {
            errors.push(value.span, format_args!("`{key}`: {why}"));
            None
        }
    }
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
    use crate::duration::parse;
    use std::time::Duration;

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse("500ms"), Ok(ms(500)));
        assert_eq!(parse("5s"), Ok(ms(5_000)));
        assert_eq!(parse("2m"), Ok(ms(120_000)));
        assert_eq!(parse("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("1.5s"), Ok(ms(1_500)));
        assert_eq!(parse("1h 30m"), Ok(ms(5_400_000)));
        assert!(
            parse("5")
                .unwrap_err()
                .contains("has no unit: add one, like `5s`")
        );
        assert!(parse("s").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("99999999999999999999h").is_err());
    }
}
