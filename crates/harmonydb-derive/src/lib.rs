//! The procedural macros of `harmonydb`: `#[derive(FromRow)]`, and the statement writer
//! behind `harmonydb::batch_sql!` (documented there; see `batch.rs`).
//!
//! `#[derive(FromRow)]` builds a struct from a result row, reading each named field from the
//! column of the same name.
//!
//! Field attributes:
//! * `#[harmonydb(rename = "col")]` reads column `col` instead of the field name;
//! * `#[harmonydb(default)]` uses `Default::default()` when the column is absent from the
//!   result (a NULL still needs an `Option` field).

use proc_macro::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput, Fields, LitStr, parse_macro_input};

/// Derives `harmonydb::FromRow` for a struct with named fields.
#[proc_macro_derive(FromRow, attributes(harmonydb))]
pub fn derive_from_row(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            name,
            "FromRow can only be derived for structs",
        ));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(
            name,
            "FromRow needs a struct with named fields",
        ));
    };
    let mut reads = Vec::new();
    for field in &fields.named {
        let ident = field.ident.as_ref().expect("named field");
        let ty = &field.ty;
        let mut column = ident.to_string().trim_start_matches("r#").to_owned();
        let mut default = false;
        for attr in &field.attrs {
            if !attr.path().is_ident("harmonydb") {
                continue;
            }
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename") {
                    let lit: LitStr = meta.value()?.parse()?;
                    column = lit.value();
                    Ok(())
                } else if meta.path.is_ident("default") {
                    default = true;
                    Ok(())
                } else {
                    Err(meta.error("expected `rename = \"column\"` or `default`"))
                }
            })?;
        }
        let read = if default {
            quote! {
                #ident: if row.columns().iter().any(|c| c.eq_ignore_ascii_case(#column)) {
                    row.get::<#ty>(#column)?
                } else {
                    ::core::default::Default::default()
                }
            }
        } else {
            quote! { #ident: row.get::<#ty>(#column)? }
        };
        reads.push(read);
    }
    Ok(quote! {
        impl #impl_generics ::harmonydb::FromRow for #name #ty_generics #where_clause {
            fn from_row(row: &::harmonydb::Row) -> ::harmonydb::Result<Self> {
                ::core::result::Result::Ok(Self { #(#reads,)* })
            }
        }
    })
}

mod batch;

/// The implementation of `harmonydb::batch_sql!`, which documents it; called through that
/// macro, which passes the path of `harmonydb` first (`$crate; …`).
#[doc(hidden)]
#[proc_macro]
pub fn batch_sql(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as batch::BatchSql);
    match input.expand() {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}
