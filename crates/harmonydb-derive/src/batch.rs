//! `batch_sql!`: one statement over a batch of rows, written for both dialects from one
//! column list, and the type that holds and binds its rows.
//!
//! The SQL text is assembled here, at compile time, from string literals and the declared
//! column names and types, which are Rust identifiers and a closed set of keywords: nothing
//! a caller can reach at run time is ever part of the text.

use std::collections::HashSet;

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use syn::ext::IdentExt as _;
use syn::parse::{Parse, ParseStream};
use syn::{Attribute, Ident, LitInt, LitStr, Token, Visibility, braced, parenthesized};

/// The parsed invocation: `$crate; ATTRS VIS struct NAME; PIECES`.
pub(crate) struct BatchSql {
    krate: TokenStream,
    attrs: Vec<Attribute>,
    vis: Visibility,
    name: Ident,
    before: Vec<LitStr>,
    rows: Rows,
    after: Vec<LitStr>,
}

/// `rows($N) as ALIAS { COLUMN: TYPE, … }`.
struct Rows {
    first: LitInt,
    alias: Ident,
    columns: Vec<Column>,
}

struct Column {
    name: Ident,
    ty: SqlType,
    nullable: bool,
}

#[derive(Clone, Copy)]
enum SqlType {
    Bigint,
    Text,
    Boolean,
    Timestamptz,
}

impl SqlType {
    fn parse(ident: &Ident) -> syn::Result<Self> {
        Ok(match ident.to_string().as_str() {
            "bigint" => SqlType::Bigint,
            "text" => SqlType::Text,
            "boolean" => SqlType::Boolean,
            "timestamptz" => SqlType::Timestamptz,
            _ => {
                return Err(syn::Error::new_spanned(
                    ident,
                    "a batch column is `bigint`, `text`, `boolean` or `timestamptz`, or `Option<…>` of one",
                ));
            }
        })
    }

    fn pg(self) -> &'static str {
        match self {
            SqlType::Bigint => "bigint",
            SqlType::Text => "text",
            SqlType::Boolean => "boolean",
            SqlType::Timestamptz => "timestamptz",
        }
    }
}

impl Parse for BatchSql {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut krate = TokenStream::new();
        while !input.peek(Token![;]) {
            krate.extend([input.parse::<proc_macro2::TokenTree>()?]);
        }
        input.parse::<Token![;]>()?;
        let attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        input.parse::<Token![struct]>()?;
        let name: Ident = input.parse()?;
        input.parse::<Token![;]>()?;

        let mut before = Vec::new();
        let mut after = Vec::new();
        let mut rows = None;
        while !input.is_empty() {
            if input.peek(LitStr) {
                let piece = input.parse()?;
                if rows.is_none() {
                    before.push(piece);
                } else {
                    after.push(piece);
                }
            } else {
                let keyword: Ident = input.parse()?;
                if keyword != "rows" {
                    return Err(syn::Error::new_spanned(
                        keyword,
                        "expected a string literal or `rows($N) as alias { column: type, … }`",
                    ));
                }
                if rows.is_some() {
                    return Err(syn::Error::new_spanned(
                        keyword,
                        "a statement has one batch of rows",
                    ));
                }
                rows = Some(parse_rows(input)?);
            }
            if input.peek(Token![,]) {
                input.parse::<Token![,]>()?;
            }
        }
        let rows = rows.ok_or_else(|| {
            input.error("missing the batch: `rows($N) as alias { column: type, … }`")
        })?;
        Ok(BatchSql {
            krate,
            attrs,
            vis,
            name,
            before,
            rows,
            after,
        })
    }
}

fn parse_rows(input: ParseStream<'_>) -> syn::Result<Rows> {
    let param;
    parenthesized!(param in input);
    param.parse::<Token![$]>()?;
    let first: LitInt = param.parse()?;
    input.parse::<Token![as]>()?;
    let alias: Ident = input.parse()?;
    let body;
    braced!(body in input);
    let mut columns = Vec::new();
    while !body.is_empty() {
        let name: Ident = body.parse()?;
        body.parse::<Token![:]>()?;
        let ty_ident: Ident = body.parse()?;
        let (ty, nullable) = if ty_ident == "Option" {
            body.parse::<Token![<]>()?;
            let inner: Ident = body.parse()?;
            body.parse::<Token![>]>()?;
            (SqlType::parse(&inner)?, true)
        } else {
            (SqlType::parse(&ty_ident)?, false)
        };
        columns.push(Column { name, ty, nullable });
        if !body.is_empty() {
            body.parse::<Token![,]>()?;
        }
    }
    Ok(Rows {
        first,
        alias,
        columns,
    })
}

/// The `$n` placeholders of SQL text, outside quoted literals.
fn placeholders(sql: &str) -> Vec<u64> {
    let mut found = Vec::new();
    let mut quoted = false;
    for (i, c) in sql.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '$' if !quoted => {
                let digits: String = sql[i + 1..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(n) = digits.parse() {
                    found.push(n);
                }
            }
            _ => {}
        }
    }
    found
}

impl BatchSql {
    pub(crate) fn expand(self) -> syn::Result<TokenStream> {
        let BatchSql {
            krate,
            attrs,
            vis,
            name,
            before,
            rows,
            after,
        } = self;
        let first: u64 = rows.first.base10_parse()?;
        if first == 0 {
            return Err(syn::Error::new_spanned(
                &rows.first,
                "placeholders count from $1",
            ));
        }
        if rows.columns.is_empty() {
            return Err(syn::Error::new_spanned(
                &rows.alias,
                "a batch needs at least one column",
            ));
        }
        let mut seen = HashSet::new();
        for c in &rows.columns {
            let column = c.name.unraw().to_string();
            if column == "ord" {
                return Err(syn::Error::new_spanned(
                    &c.name,
                    "`ord` is the row's position in the batch (from 1); name the column otherwise",
                ));
            }
            if !seen.insert(column) {
                return Err(syn::Error::new_spanned(&c.name, "duplicate column"));
            }
        }
        // The batch binds one parameter on SQLite and one per column on Postgres, so any
        // placeholder after it would have a different number in each dialect.
        for piece in before.iter().chain(&after) {
            if let Some(n) = placeholders(&piece.value())
                .into_iter()
                .find(|n| *n >= first)
            {
                return Err(syn::Error::new_spanned(
                    piece,
                    format!(
                        "${n} is at or after the batch's ${first}: the batch binds the last parameters (one on SQLite, one per column on Postgres), so start it after every other placeholder"
                    ),
                ));
            }
        }

        let alias = rows.alias.to_string();
        // `r#type` names the column `type`.
        let names: Vec<String> = rows
            .columns
            .iter()
            .map(|c| c.name.unraw().to_string())
            .collect();
        let sqlite_cells: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!(", value ->> {i} AS {n}"))
            .collect();
        let sqlite_source = format!(
            "(SELECT key + 1 AS ord{} FROM json_each(${first})) AS {alias}",
            sqlite_cells.concat()
        );
        let pg_arrays: Vec<String> = rows
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}[]", first + i as u64, c.ty.pg()))
            .collect();
        let pg_source = format!(
            "unnest({}) WITH ORDINALITY AS {alias}({}, ord)",
            pg_arrays.join(", "),
            names.join(", ")
        );
        let text = |pieces: &[LitStr]| pieces.iter().map(LitStr::value).collect::<String>();
        let (before, after) = (text(&before), text(&after));
        let sqlite = LitStr::new(
            &format!("{before}{sqlite_source}{after}"),
            Span::call_site(),
        );
        let postgres = LitStr::new(&format!("{before}{pg_source}{after}"), Span::call_site());

        let row = Ident::new("row", Span::mixed_site());
        let mut types = Vec::new();
        let mut args = Vec::new();
        let mut cells = Vec::new();
        for c in &rows.columns {
            let (kind, rust, method) = match c.ty {
                SqlType::Bigint => (quote!(Int), quote!(i64), format_ident!("int")),
                SqlType::Text => (quote!(Text), quote!(&str), format_ident!("text")),
                SqlType::Boolean => (quote!(Bool), quote!(bool), format_ident!("bool")),
                SqlType::Timestamptz => (
                    quote!(Timestamp),
                    quote!(#krate::Timestamp),
                    format_ident!("timestamp"),
                ),
            };
            let arg = &c.name;
            types.push(quote!(#krate::BatchType::#kind));
            if c.nullable {
                args.push(quote!(#arg: ::core::option::Option<#rust>));
                cells.push(quote!(#row.#method(#arg);));
            } else {
                args.push(quote!(#arg: #rust));
                cells.push(quote!(#row.#method(::core::option::Option::Some(#arg));));
            }
        }
        let first = first as usize;
        Ok(quote! {
            #(#attrs)*
            #vis struct #name(#krate::BatchRows);

            impl #name {
                /// The statement, for SQLite and for Postgres.
                #vis const SQL: #krate::PerDialect = #krate::PerDialect {
                    sqlite: #sqlite,
                    postgres: #postgres,
                };

                /// An empty batch for `dialect`, with room for `rows` rows.
                #vis fn new(dialect: #krate::Dialect, rows: usize) -> Self {
                    Self(#krate::BatchRows::new(dialect, &[#(#types),*], rows))
                }

                /// Appends one row.
                #[allow(clippy::too_many_arguments)]
                #vis fn push(&mut self, #(#args),*) {
                    let mut #row = self.0.row();
                    #(#cells)*
                    #row.end();
                }

                /// The statement for this batch's dialect.
                #vis fn sql(&self) -> &'static str {
                    Self::SQL.get(self.0.dialect())
                }

                /// The statement's parameters: `lead` binds the placeholders before the
                /// batch, the batch the rest.
                #vis fn params<'a>(
                    &'a self,
                    lead: #krate::Params<'a>,
                ) -> ::std::vec::Vec<&'a dyn #krate::ToValue> {
                    self.0.params(lead, #first)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_outside_quotes() {
        assert_eq!(
            placeholders("SELECT $1, '$2', $10 FROM t WHERE a = 'it''s' AND b = $3"),
            vec![1, 10, 3]
        );
        assert!(placeholders("SELECT 1").is_empty());
    }
}
