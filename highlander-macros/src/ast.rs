//! Parsing: the attribute's arguments into a plain model, every problem
//! recorded with the span of the token at fault.

use proc_macro2::{Span, TokenStream};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, Meta, Token};

/// The keys the attribute accepts, in the order the docs list them.
pub(crate) const KEYS: &[&str] = &[
    "id",
    "restart",
    "shutdown",
    "intensity",
    "period",
    "prefer",
    "avoid",
    "init",
    "crate",
];

/// One value as written, with its span.
pub(crate) struct WithSpan<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// The attribute's arguments, not yet validated.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) id: Option<WithSpan<String>>,
    pub(crate) restart: Option<WithSpan<String>>,
    pub(crate) shutdown: Option<WithSpan<String>>,
    pub(crate) intensity: Option<WithSpan<u32>>,
    pub(crate) period: Option<WithSpan<String>>,
    /// `prefer = [..]`: each entry with its span.
    pub(crate) prefer: Option<WithSpan<Vec<WithSpan<String>>>>,
    /// `avoid = [..]`: each entry with its span.
    pub(crate) avoid: Option<WithSpan<Vec<WithSpan<String>>>>,
    pub(crate) init: Option<syn::Path>,
    pub(crate) krate: Option<syn::Path>,
    /// `id` was written, even if its value was refused (so no second
    /// "missing `id`" error cascades from a bad value).
    pub(crate) id_written: bool,
}

/// Collects every error instead of stopping at the first (as serde_derive's
/// `Ctxt` does).
#[derive(Default)]
pub(crate) struct Errors {
    errors: Vec<syn::Error>,
}

impl Errors {
    pub(crate) fn push(&mut self, span: Span, message: impl std::fmt::Display) {
        self.errors.push(syn::Error::new(span, message));
    }

    pub(crate) fn push_error(&mut self, error: syn::Error) {
        self.errors.push(error);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.errors.len()
    }

    pub(crate) fn to_compile_errors(&self) -> TokenStream {
        self.errors
            .iter()
            .map(syn::Error::to_compile_error)
            .collect()
    }
}

/// Parses `id = "...", restart = "...", ...`.
pub(crate) fn parse_args(tokens: TokenStream, errors: &mut Errors) -> Args {
    let mut args = Args::default();
    let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(metas) => metas,
        Err(e) => {
            errors.push_error(e);
            return args;
        }
    };
    for meta in metas {
        let Meta::NameValue(nv) = &meta else {
            let name = meta
                .path()
                .get_ident()
                .map(|i| i.to_string())
                .unwrap_or_default();
            if KEYS.contains(&name.as_str()) {
                errors.push(
                    meta.span(),
                    format_args!("`{name}` needs a value: `{name} = ...`"),
                );
            } else {
                unknown_key(errors, meta.path());
            }
            continue;
        };
        let Some(key) = nv.path.get_ident().map(|i| i.to_string()).or_else(|| {
            // `crate` is a keyword, so it parses as a path segment, not an ident.
            nv.path
                .is_ident("crate")
                .then(|| "crate".to_string())
                .or_else(|| {
                    (nv.path.segments.len() == 1 && nv.path.segments[0].ident == "crate")
                        .then(|| "crate".to_string())
                })
        }) else {
            unknown_key(errors, &nv.path);
            continue;
        };
        let key_span = nv.path.span();
        let value = &nv.value;
        match key.as_str() {
            "id" => {
                args.id_written = true;
                set(
                    &mut args.id,
                    string(value, "id", errors),
                    key_span,
                    "id",
                    errors,
                )
            }
            "restart" => set(
                &mut args.restart,
                string(value, "restart", errors),
                key_span,
                "restart",
                errors,
            ),
            "shutdown" => set(
                &mut args.shutdown,
                string(value, "shutdown", errors),
                key_span,
                "shutdown",
                errors,
            ),
            "period" => set(
                &mut args.period,
                string(value, "period", errors),
                key_span,
                "period",
                errors,
            ),
            "prefer" => set(
                &mut args.prefer,
                strings(value, "prefer", errors),
                key_span,
                "prefer",
                errors,
            ),
            "avoid" => set(
                &mut args.avoid,
                strings(value, "avoid", errors),
                key_span,
                "avoid",
                errors,
            ),
            "intensity" => {
                let parsed = integer(value, errors);
                set(&mut args.intensity, parsed, key_span, "intensity", errors)
            }
            "init" => {
                let parsed = path(value, "init", errors);
                set(&mut args.init, parsed, key_span, "init", errors)
            }
            "crate" => {
                let parsed = path(value, "crate", errors);
                set(&mut args.krate, parsed, key_span, "crate", errors)
            }
            _ => unknown_key(errors, &nv.path),
        }
    }
    args
}

fn unknown_key(errors: &mut Errors, path: &syn::Path) {
    let name = path
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect::<Vec<_>>()
        .join("::");
    let valid = KEYS
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match KEYS.iter().find(|k| edit_distance(k, &name) <= 2) {
        Some(close) => errors.push(
            path.span(),
            format_args!("unknown key `{name}` (did you mean `{close}`?): expected one of {valid}"),
        ),
        None => errors.push(
            path.span(),
            format_args!("unknown key `{name}`: expected one of {valid}"),
        ),
    }
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Stores the first value of a key; a second occurrence is an error at its key.
fn set<T>(slot: &mut Option<T>, value: Option<T>, key_span: Span, key: &str, errors: &mut Errors) {
    if slot.is_some() {
        errors.push(key_span, format_args!("`{key}` set multiple times"));
    } else if value.is_some() {
        *slot = value;
    }
}

fn string(value: &Expr, key: &str, errors: &mut Errors) -> Option<WithSpan<String>> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Some(WithSpan {
            value: s.value(),
            span: s.span(),
        }),
        other => {
            errors.push(
                other.span(),
                format_args!("`{key}` must be a string literal: `{key} = \"...\"`"),
            );
            None
        }
    }
}

/// `["a", "b"]`, or one string alone. Every element that is not a string
/// literal is an error at its span.
fn strings(
    value: &Expr,
    key: &str,
    errors: &mut Errors,
) -> Option<WithSpan<Vec<WithSpan<String>>>> {
    let elems: Vec<&Expr> = match value {
        Expr::Array(array) => array.elems.iter().collect(),
        Expr::Lit(ExprLit {
            lit: Lit::Str(_), ..
        }) => vec![value],
        other => {
            errors.push(
                other.span(),
                format_args!(
                    "`{key}` must be a list of node names or labels: `{key} = [\"node-a\", \"zone=eu\"]`"
                ),
            );
            return None;
        }
    };
    let mut entries = Vec::new();
    let mut ok = true;
    for elem in elems {
        match elem {
            Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            }) => entries.push(WithSpan {
                value: s.value(),
                span: s.span(),
            }),
            other => {
                errors.push(
                    other.span(),
                    format_args!(
                        "each `{key}` entry must be a string literal: `{key} = [\"node-a\", \"zone=eu\"]`"
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then(|| WithSpan {
        value: entries,
        span: value.span(),
    })
}

fn integer(value: &Expr, errors: &mut Errors) -> Option<WithSpan<u32>> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(i), ..
        }) => match i.base10_parse::<u32>() {
            Ok(n) => Some(WithSpan {
                value: n,
                span: i.span(),
            }),
            Err(_) => {
                errors.push(
                    i.span(),
                    "`intensity` must be a whole number of restarts, like `intensity = 3`",
                );
                None
            }
        },
        other => {
            errors.push(
                other.span(),
                "`intensity` must be a whole number of restarts, like `intensity = 3`",
            );
            None
        }
    }
}

fn path(value: &Expr, key: &str, errors: &mut Errors) -> Option<syn::Path> {
    match value {
        Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => Some(p.path.clone()),
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => match s.parse::<syn::Path>() {
            Ok(p) => Some(p),
            Err(_) => {
                errors.push(
                    s.span(),
                    format_args!("`{key}` must be a path, like `{key} = my::path`"),
                );
                None
            }
        },
        other => {
            errors.push(
                other.span(),
                format_args!("`{key}` must be a path, like `{key} = my::path`"),
            );
            None
        }
    }
}
