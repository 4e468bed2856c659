//! The `#[highlander(...)]` attribute on any token string: parsing (`ast`),
//! checking (`valid`) and expanding never panic, and every refusal is a
//! compile error with a message.
//!
//! Input: `arguments \0 item`; without `\0`, the item is `struct S;`.

#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use proc_macro2::TokenStream;

// A proc-macro crate cannot export functions: include its stages by path.
#[allow(dead_code, unreachable_pub)]
#[path = "../../highlander-macros/src/ast.rs"]
mod ast;
#[allow(dead_code, unreachable_pub)]
#[path = "../../highlander-macros/src/duration.rs"]
mod duration;
#[allow(dead_code, unreachable_pub)]
#[path = "../../highlander-macros/src/expand.rs"]
mod expand;
#[allow(dead_code, unreachable_pub)]
#[path = "../../highlander-macros/src/valid.rs"]
mod valid;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (args, item) = text.split_once('\0').unwrap_or((text, "struct S;"));
    let (Ok(args), Ok(item)) = (TokenStream::from_str(args), TokenStream::from_str(item)) else {
        return;
    };

    // The stages one by one, as the attribute runs them.
    let mut errors = ast::Errors::default();
    let parsed = ast::parse_args(args.clone(), &mut errors);
    let checked = valid::check_args(parsed, &mut errors);
    if let Ok(item) = syn::parse2::<syn::Item>(item.clone()) {
        let target = valid::check_item(&item, &mut errors);
        if target.is_none() || checked.is_none() {
            assert!(!errors.is_empty(), "refused without an error");
        }
    }
    let _ = errors.to_compile_errors();

    // And the whole attribute.
    let _ = expand::highlander(args, item);
});
