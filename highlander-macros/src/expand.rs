//! Expansion: the registration, the `Singleton` impl, and the build glue.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};

use crate::ast::{Errors, parse_args};
use crate::valid::{Checked, Target, check_args, check_item};

pub(crate) fn highlander(args: TokenStream, input: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = parse_args(args, &mut errors);
    let item = match syn::parse2::<syn::Item>(input.clone()) {
        Ok(item) => item,
        Err(e) => {
            // Not an item at all: leave the tokens to rustc and add our error.
            errors.push_error(e);
            let errs = errors.to_compile_errors();
            return quote!(#input #errs);
        }
    };
    let target = check_item(&item, &mut errors);
    let checked = check_args(parsed, &mut errors);
    match (target, checked) {
        (Some(target), Some(checked)) if errors.is_empty() => {
            let glue = expand(&target, &checked);
            quote!(#item #glue)
        }
        _ => {
            // Keep the user's item so one mistake does not cascade.
            let errs = errors.to_compile_errors();
            quote!(#item #errs)
        }
    }
}

fn expand(target: &Target, checked: &Checked) -> TokenStream {
    let ident = &target.ident;
    let krate = &checked.krate;
    let id = &checked.id;
    let restart = format_ident!("{}", checked.restart);
    let (shutdown_secs, shutdown_nanos) =
        (checked.shutdown.as_secs(), checked.shutdown.subsec_nanos());
    let intensity = checked.intensity;
    let (period_secs, period_nanos) = (checked.period.as_secs(), checked.period.subsec_nanos());
    let p = quote!(#krate::__private);
    let construct = match &checked.init {
        Some(init) => {
            quote_spanned! {init.segments.last().map(|s| s.ident.span()).unwrap_or_else(proc_macro2::Span::call_site)=>
                let service: #ident = #init(ctx).await?;
            }
        }
        None => quote_spanned! {ident.span()=>
            let service: #ident = <#ident as #p::core::default::Default>::default();
        },
    };
    quote! {
        #[doc(hidden)]
        #[allow(non_local_definitions)]
        const _: () = {
            impl #krate::Singleton for #ident {
                const ID: &'static str = #id;

                fn child_spec() -> #krate::ChildSpec {
                    fn build(
                        ctx: &#krate::Context,
                    ) -> #p::BoxFuture<'_, #krate::Result<#p::std::boxed::Box<dyn #p::DynService>>> {
                        #p::std::boxed::Box::pin(async move {
                            #construct
                            #p::core::result::Result::Ok(#p::boxed(service))
                        })
                    }
                    #p::__spec(
                        #id,
                        #p::core::concat!(#p::core::module_path!(), "::", #p::core::stringify!(#ident)),
                        #krate::Restart::#restart,
                        #p::core::time::Duration::new(#shutdown_secs, #shutdown_nanos),
                        #krate::Intensity {
                            max_restarts: #intensity,
                            period: #p::core::time::Duration::new(#period_secs, #period_nanos),
                        },
                        build,
                    )
                }
            }

            #p::inventory::submit! {
                #p::Registration {
                    id: #id,
                    type_name: #p::core::concat!(#p::core::module_path!(), "::", #p::core::stringify!(#ident)),
                    spec: <#ident as #krate::Singleton>::child_spec,
                }
            }
        };
    }
}
