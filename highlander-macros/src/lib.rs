//! The `#[highlander]` attribute. Use it through the `highlander` crate,
//! which re-exports it and documents every key.
//!
//! The work is split in three stages, each testable alone:
//! `ast` parses the attribute into a plain model, `valid` checks it and
//! collects every error with its span, `expand` writes the code.

use proc_macro::TokenStream;

mod ast;
mod duration;
mod expand;
mod valid;

/// Marks a type as a cluster-wide singleton. See `highlander::highlander`.
#[proc_macro_attribute]
pub fn highlander(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::highlander(args.into(), input.into()).into()
}
