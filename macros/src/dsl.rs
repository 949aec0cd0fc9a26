//! `#[mask_mod]` and `#[score_mod]`: one restricted Rust function lowered to a host
//! implementation generic over the number type and a `#[cube]` implementation.
//!
//! The language (documented for users in `gqa::dsl`): captures (`&Aux<T>` tables, scalars),
//! then the score (score mods), then the position; a body of `let`s and one expression over
//! literals, position fields, captures, arithmetic, comparisons, logic, `if`/`else`, casts and
//! a whitelist of functions. Every expression is typed here (integer, float or bool), so that
//! each gets its host form (`i64`, the generic `N`, `bool`) and its kernel form (`i32`, `f32`,
//! `bool`). What is outside the language is an error spanned at the user's tokens.

use std::collections::HashMap;

use proc_macro2::{Literal, Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{BinOp, Expr, FnArg, Ident, ItemFn, Pat, ReturnType, Stmt, Type, UnOp, parse2};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mask,
    Score,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ty {
    Int,
    Float,
    Bool,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Int => "an integer",
            Ty::Float => "a float",
            Ty::Bool => "a bool",
        }
    }
}

/// A table's or scalar's element type.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Elem {
    I32,
    U32,
    F32,
}

impl Elem {
    fn parse(ty: &Type) -> Option<Elem> {
        match ty {
            Type::Path(p) if p.qself.is_none() => match p.path.get_ident()?.to_string().as_str() {
                "i32" => Some(Elem::I32),
                "u32" => Some(Elem::U32),
                "f32" => Some(Elem::F32),
                _ => None,
            },
            _ => None,
        }
    }

    fn ty(self) -> Ty {
        match self {
            Elem::F32 => Ty::Float,
            _ => Ty::Int,
        }
    }

    fn rust(self) -> TokenStream {
        match self {
            Elem::I32 => quote!(i32),
            Elem::U32 => quote!(u32),
            Elem::F32 => quote!(f32),
        }
    }
}

#[derive(Clone)]
enum Var {
    Table { elem: Elem, slot: u32 },
    Scalar { elem: Elem, slot: u32 },
    Local(Ty),
    Score,
    Position,
}

struct Typed {
    ty: Ty,
    host: TokenStream,
    cube: TokenStream,
    /// Kernel code for the float expression's derivative with respect to the score (times the
    /// score's tangent `__t`), by the rules of the host's `Dual`; `0.0f32` where the expression
    /// does not depend on the score or is not a float.
    tangent: TokenStream,
}

/// The kernel name of a float local's tangent.
fn tangent_name(ident: &Ident) -> Ident {
    format_ident!("__t_{}", ident)
}

fn zero() -> TokenStream {
    quote!(0.0f32)
}

struct Lowering {
    kind: Kind,
    name: String,
    vars: HashMap<String, Var>,
}

fn err<T>(span: Span, message: impl std::fmt::Display) -> syn::Result<T> {
    Err(syn::Error::new(span, message))
}

/// The `Aux<T>` inside `&Aux<T>`, if that is the type.
fn table_elem(ty: &Type) -> Option<Elem> {
    let Type::Reference(r) = ty else { return None };
    if r.mutability.is_some() {
        return None;
    }
    let Type::Path(p) = &*r.elem else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Aux" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        syn::GenericArgument::Type(t) if args.args.len() == 1 => Elem::parse(t),
        _ => None,
    }
}

fn is_position(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Position" && s.arguments.is_empty()))
}

fn camel(name: &str) -> String {
    name.split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            let first = chars.next().map(|c| c.to_ascii_uppercase());
            first.into_iter().chain(chars).collect::<String>()
        })
        .collect()
}

pub fn expand(kind: Kind, attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let attribute = match kind {
        Kind::Mask => "mask_mod",
        Kind::Score => "score_mod",
    };
    if !attr.is_empty() {
        return err(attr.span(), format!("#[{attribute}] takes no arguments"));
    }
    let function: ItemFn = parse2(item)?;
    let sig = &function.sig;
    if let Some(t) = sig.constness.as_ref() {
        return err(
            t.span(),
            format!("a #[{attribute}] function cannot be const"),
        );
    }
    if let Some(t) = sig.asyncness.as_ref() {
        return err(
            t.span(),
            format!("a #[{attribute}] function cannot be async"),
        );
    }
    if let Some(t) = sig.unsafety.as_ref() {
        return err(
            t.span(),
            format!("a #[{attribute}] function cannot be unsafe"),
        );
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return err(
            sig.generics.span(),
            format!("a #[{attribute}] function cannot be generic"),
        );
    }
    for attr in &function.attrs {
        if !attr.path().is_ident("doc") {
            return err(
                attr.span(),
                format!("only doc comments may accompany #[{attribute}]"),
            );
        }
    }
    let docs: Vec<_> = function.attrs.iter().collect();
    let vis = &function.vis;
    let fn_name = &sig.ident;
    let type_name = format_ident!("{}", camel(&fn_name.to_string()), span = fn_name.span());

    // Parameters: captures, [score], position.
    let mut params: Vec<(Ident, Type)> = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => return err(r.span(), "a mod is a free function: no `self`"),
            FnArg::Typed(t) => match &*t.pat {
                Pat::Ident(p)
                    if p.by_ref.is_none() && p.mutability.is_none() && p.subpat.is_none() =>
                {
                    params.push((p.ident.clone(), (*t.ty).clone()))
                }
                other => return err(other.span(), "parameters must be plain names"),
            },
        }
    }
    let Some((at_name, at_ty)) = params.pop() else {
        return err(
            sig.span(),
            "the last parameter must be the position: `at: Position`",
        );
    };
    if !is_position(&at_ty) {
        return err(
            at_ty.span(),
            "the last parameter must be the position: `at: Position`",
        );
    }
    let mut vars = HashMap::new();
    vars.insert(at_name.to_string(), Var::Position);
    let mut score_ty = None;
    if kind == Kind::Score {
        let Some((s_name, s_ty)) = params.pop() else {
            return err(
                sig.inputs.span(),
                "a score mod takes the score before the position: `s: f32, at: Position`",
            );
        };
        if Elem::parse(&s_ty) != Some(Elem::F32) {
            return err(s_ty.span(), "the score is an `f32`: `s: f32, at: Position`");
        }
        vars.insert(s_name.to_string(), Var::Score);
        score_ty = Some(s_ty);
    }
    struct Capture {
        name: Ident,
        elem: Elem,
        table: bool,
    }
    let mut captures = Vec::new();
    for (slot, (name, ty)) in params.iter().enumerate() {
        let slot = slot as u32;
        let (var, table) = if let Some(elem) = table_elem(ty) {
            (Var::Table { elem, slot }, true)
        } else if let Some(elem) = Elem::parse(ty) {
            (Var::Scalar { elem, slot }, false)
        } else {
            return err(
                ty.span(),
                "a capture is a table `&Aux<i32>`, `&Aux<u32>`, `&Aux<f32>` or a scalar `i32`, `u32`, `f32`",
            );
        };
        if vars.insert(name.to_string(), var).is_some() {
            return err(name.span(), "this name is used twice");
        }
        captures.push(Capture {
            name: name.clone(),
            elem: table_elem(ty).or_else(|| Elem::parse(ty)).expect("checked"),
            table,
        });
    }
    let expected = match kind {
        Kind::Mask => Ty::Bool,
        Kind::Score => Ty::Float,
    };
    match &sig.output {
        ReturnType::Type(_, ty)
            if expected == Ty::Bool
                && matches!(&**ty, Type::Path(p) if p.path.is_ident("bool")) => {}
        ReturnType::Type(_, ty) if expected == Ty::Float && Elem::parse(ty) == Some(Elem::F32) => {}
        other => {
            let want = if kind == Kind::Mask { "bool" } else { "f32" };
            return err(
                other.span(),
                format!("a #[{attribute}] function returns `{want}`"),
            );
        }
    }

    let mut lowering = Lowering {
        kind,
        name: fn_name.to_string(),
        vars,
    };
    let (host_body, cube_body, tangent_body) = lowering.body(&function.block, expected)?;

    let field_tys: Vec<TokenStream> = captures
        .iter()
        .map(|c| {
            let elem = c.elem.rust();
            if c.table {
                quote!(::gqa::dsl::Aux<#elem>)
            } else {
                elem
            }
        })
        .collect();
    let field_names: Vec<&Ident> = captures.iter().map(|c| &c.name).collect();
    let words: Vec<TokenStream> = captures
        .iter()
        .map(|c| {
            let name = &c.name;
            if c.table {
                quote!(slots.push(::gqa::dsl::__private::table_words(&self.#name));)
            } else {
                quote!(slots.push(::std::vec![::gqa::dsl::__private::AuxElement::to_word(self.#name)]);)
            }
        })
        .collect();
    let slots = captures.len() as u32;
    let name_str = fn_name.to_string();
    let struct_fields = if captures.is_empty() {
        quote!(;)
    } else {
        quote!({ #(#field_names: #field_tys,)* })
    };
    let construct = if captures.is_empty() {
        quote!(#type_name)
    } else {
        quote!(#type_name { #(#field_names,)* })
    };
    // The signature's own types, checked against the real ones: a `Position` or `Aux` that
    // is not gqa's is an error at the user's tokens, and the user's imports count as used.
    let signature_types: Vec<TokenStream> = captures
        .iter()
        .zip(&params)
        .map(|(c, (_, ty))| {
            let elem = c.elem.rust();
            let real = if c.table {
                quote!(&::gqa::dsl::Aux<#elem>)
            } else {
                elem
            };
            quote_spanned!(ty.span()=> let _: ::core::marker::PhantomData<#ty> = ::core::marker::PhantomData::<#real>;)
        })
        .collect();
    let score_type = score_ty.as_ref().map(|ty| {
        quote_spanned!(ty.span()=> let _: ::core::marker::PhantomData<#ty> = ::core::marker::PhantomData::<f32>;)
    });
    let signature_check = quote_spanned! {at_ty.span()=>
        const _: () = {
            #[allow(dead_code)]
            fn signature() {
                let _: ::core::marker::PhantomData<#at_ty> =
                    ::core::marker::PhantomData::<::gqa::dsl::__private::Position>;
                #score_type
                #(#signature_types)*
            }
        };
    };
    let type_doc = format!("The mod `{name_str}` (made by `{name_str}(…)`, see `gqa::dsl`).");
    let common = quote! {
        #signature_check

        #[doc = #type_doc]
        #[derive(Clone, Debug)]
        #vis struct #type_name #struct_fields

        #(#docs)*
        #[must_use]
        #vis fn #fn_name(#(#field_names: #field_tys),*) -> #type_name {
            #construct
        }

        impl ::gqa::dsl::__private::Captures for #type_name {
            const SLOTS: u32 = #slots;
            #[allow(unused_variables)]
            fn captured_words(&self, slots: &mut ::std::vec::Vec<::std::vec::Vec<u32>>) {
                #(#words)*
            }
        }
    };
    let cube_params = quote! {
        __aux: &[u32], __b: i32, __h: i32, __q: i32, __k: i32, __seq_q: i32, __seq_k: i32,
        #[comptime] __base: u32
    };
    let expanded = match kind {
        Kind::Mask => quote! {
            #common

            impl ::gqa::dsl::__private::MaskMod for #type_name {
                fn name(&self) -> ::std::string::String {
                    ::std::string::String::from(#name_str)
                }
                #[allow(unused_parens, clippy::all)]
                fn visible(&self, __at: ::gqa::dsl::__private::Position) -> bool {
                    #[allow(dead_code)]
                    type N = f32;
                    #host_body
                }
            }

            impl<Rhs: ::gqa::dsl::MaskMod> ::core::ops::BitAnd<Rhs> for #type_name {
                type Output = ::gqa::dsl::And<Self, Rhs>;
                fn bitand(self, rhs: Rhs) -> Self::Output {
                    ::gqa::dsl::And(self, rhs)
                }
            }
            impl<Rhs: ::gqa::dsl::MaskMod> ::core::ops::BitOr<Rhs> for #type_name {
                type Output = ::gqa::dsl::Or<Self, Rhs>;
                fn bitor(self, rhs: Rhs) -> Self::Output {
                    ::gqa::dsl::Or(self, rhs)
                }
            }
            impl ::core::ops::Not for #type_name {
                type Output = ::gqa::dsl::Not<Self>;
                fn not(self) -> Self::Output {
                    ::gqa::dsl::Not(self)
                }
            }

            ::gqa::__with_cube! {
                const _: () = {
                    use ::gqa::dsl::__private::cubecl;
                    use cubecl::prelude::*;
                    #[cube]
                    impl ::gqa::dsl::cube::CubeMask for #type_name {
                        #[allow(unused_variables, unused_parens, clippy::all)]
                        fn visible(#cube_params) -> bool {
                            #cube_body
                        }
                    }
                };
            }
        },
        Kind::Score => quote! {
            #common

            impl ::gqa::dsl::__private::ScoreMod for #type_name {
                fn name(&self) -> ::std::string::String {
                    ::std::string::String::from(#name_str)
                }
                #[allow(unused_parens, clippy::all)]
                fn apply<N: ::gqa::dsl::__private::Real>(
                    &self,
                    __s: N,
                    __at: ::gqa::dsl::__private::Position,
                ) -> N {
                    #host_body
                }
            }

            ::gqa::__with_cube! {
                const _: () = {
                    use ::gqa::dsl::__private::cubecl;
                    use cubecl::prelude::*;
                    #[cube]
                    impl ::gqa::dsl::cube::CubeScore for #type_name {
                        #[allow(unused_variables, unused_parens, clippy::all)]
                        fn apply(
                            __aux: &[u32], __s: f32, __b: i32, __h: i32, __q: i32, __k: i32,
                            __seq_q: i32, __seq_k: i32, #[comptime] __base: u32
                        ) -> f32 {
                            #cube_body
                        }

                        #[allow(unused_variables, unused_parens, clippy::all)]
                        fn tangent(
                            __aux: &[u32], __s: f32, __t: f32, __b: i32, __h: i32, __q: i32,
                            __k: i32, __seq_q: i32, __seq_k: i32, #[comptime] __base: u32
                        ) -> f32 {
                            #tangent_body
                        }
                    }
                };
            }
        },
    };
    Ok(expanded)
}

impl Lowering {
    fn body(
        &mut self,
        block: &syn::Block,
        expected: Ty,
    ) -> syn::Result<(TokenStream, TokenStream, TokenStream)> {
        let mut host = TokenStream::new();
        let mut cube = TokenStream::new();
        // The values, and after each float value its tangent.
        let mut tangent = TokenStream::new();
        let Some((last, lets)) = block.stmts.split_last() else {
            return err(
                block.span(),
                "the body must end with an expression (the result)",
            );
        };
        for stmt in lets {
            match stmt {
                Stmt::Local(local) => {
                    if let Some((else_token, _)) =
                        local.init.as_ref().and_then(|i| i.diverge.as_ref())
                    {
                        return err(
                            else_token.span(),
                            "`let … else` is not part of the language",
                        );
                    }
                    let (ident, annotation) = match &local.pat {
                        Pat::Ident(p)
                            if p.by_ref.is_none()
                                && p.mutability.is_none()
                                && p.subpat.is_none() =>
                        {
                            (p.ident.clone(), None)
                        }
                        Pat::Type(t) => match &*t.pat {
                            Pat::Ident(p) if p.by_ref.is_none() && p.mutability.is_none() => {
                                (p.ident.clone(), Some(&*t.ty))
                            }
                            other => return err(other.span(), "a `let` binds one immutable name"),
                        },
                        other => return err(other.span(), "a `let` binds one immutable name"),
                    };
                    let Some(init) = &local.init else {
                        return err(local.span(), "a `let` needs a value");
                    };
                    let value = self.expr(&init.expr)?;
                    if let Some(ty) = annotation {
                        let declared = match ty {
                            Type::Path(p) if p.path.is_ident("bool") => Some(Ty::Bool),
                            other => Elem::parse(other).map(Elem::ty),
                        };
                        if declared != Some(value.ty) {
                            return err(ty.span(), format!("this value is {}", value.ty.name()));
                        }
                    }
                    let (h, c) = (&value.host, &value.cube);
                    host.extend(quote!(let #ident = #h;));
                    cube.extend(quote!(let #ident = #c;));
                    tangent.extend(quote!(let #ident = #c;));
                    if value.ty == Ty::Float {
                        let (name, t) = (tangent_name(&ident), &value.tangent);
                        tangent.extend(quote!(let #name = #t;));
                    }
                    self.vars.insert(ident.to_string(), Var::Local(value.ty));
                }
                Stmt::Expr(e, _) => return err(e.span(), unsupported_statement(e)),
                Stmt::Item(item) => return err(item.span(), "items are not part of the language"),
                Stmt::Macro(m) => return err(m.span(), "macros are not part of the language"),
            }
        }
        let result = match last {
            Stmt::Expr(e, None) => self.expr(e)?,
            Stmt::Expr(e, Some(_)) => {
                return err(
                    e.span(),
                    "the body must end with an expression (the result), without `;`",
                );
            }
            other => {
                return err(
                    other.span(),
                    "the body must end with an expression (the result)",
                );
            }
        };
        if result.ty != expected {
            return err(
                last.span(),
                format!(
                    "a {} returns {}, this is {}",
                    if self.kind == Kind::Mask {
                        "mask mod"
                    } else {
                        "score mod"
                    },
                    expected.name(),
                    result.ty.name()
                ),
            );
        }
        let (h, c, t) = (&result.host, &result.cube, &result.tangent);
        host.extend(quote!(#h));
        cube.extend(quote!(#c));
        tangent.extend(quote!(#t));
        Ok((host, cube, tangent))
    }

    fn expr(&self, e: &Expr) -> syn::Result<Typed> {
        match e {
            Expr::Lit(lit) => self.literal(&lit.lit),
            Expr::Paren(p) => {
                let inner = self.expr(&p.expr)?;
                let (h, c, t) = (inner.host, inner.cube, inner.tangent);
                Ok(Typed {
                    ty: inner.ty,
                    host: quote!((#h)),
                    cube: quote!((#c)),
                    tangent: quote!((#t)),
                })
            }
            Expr::Group(g) => self.expr(&g.expr),
            Expr::Path(p) => self.name(p),
            Expr::Field(f) => self.field(f),
            Expr::Index(i) => self.index(i),
            Expr::Unary(u) => self.unary(u),
            Expr::Binary(b) => self.binary(b),
            Expr::Cast(c) => self.cast(c),
            Expr::Call(c) => self.call(c),
            Expr::If(i) => self.if_else(i),
            Expr::MethodCall(m) => err(
                m.method.span(),
                format!(
                    "method calls are not part of the language: write `{}(x, …)` where it is a function of the language (min max abs exp ln tanh sqrt floor clamp)",
                    m.method
                ),
            ),
            other => err(other.span(), unsupported_statement(other)),
        }
    }

    fn literal(&self, lit: &syn::Lit) -> syn::Result<Typed> {
        match lit {
            syn::Lit::Int(i) => {
                if !matches!(i.suffix(), "" | "i32") {
                    return err(i.span(), "integer literals are unsuffixed (or `i32`)");
                }
                let v: i64 = i.base10_parse()?;
                let Ok(v32) = i32::try_from(v) else {
                    return err(
                        i.span(),
                        "integer literals must fit in i32 (kernels compute in i32)",
                    );
                };
                let host = Literal::i64_suffixed(v);
                let cube = Literal::i32_suffixed(v32);
                Ok(Typed {
                    ty: Ty::Int,
                    host: quote!(#host),
                    cube: quote!(#cube),
                    tangent: zero(),
                })
            }
            syn::Lit::Float(f) => {
                if !matches!(f.suffix(), "" | "f32") {
                    return err(f.span(), "float literals are unsuffixed (or `f32`)");
                }
                let v: f64 = f.base10_parse()?;
                if !v.is_finite() || !(v as f32).is_finite() {
                    return err(
                        f.span(),
                        "float literals must be finite in f32 (kernels compute in f32)",
                    );
                }
                let host = Literal::f64_suffixed(v);
                let cube = Literal::f32_suffixed(v as f32);
                Ok(Typed {
                    ty: Ty::Float,
                    host: quote!(<N as ::gqa::dsl::__private::Real>::constant(#host)),
                    cube: quote!(#cube),
                    tangent: zero(),
                })
            }
            syn::Lit::Bool(b) => Ok(Typed {
                ty: Ty::Bool,
                host: quote!(#b),
                cube: quote!(#b),
                tangent: zero(),
            }),
            other => err(
                other.span(),
                "only integer, float and bool literals are part of the language",
            ),
        }
    }

    fn name(&self, p: &syn::ExprPath) -> syn::Result<Typed> {
        let Some(ident) = p.path.get_ident().filter(|_| p.qself.is_none()) else {
            return err(
                p.span(),
                "paths are not part of the language (no constants such as `f32::INFINITY`: scores stay finite; hide a key with a mask mod)",
            );
        };
        let Some(var) = self.vars.get(&ident.to_string()) else {
            return err(
                ident.span(),
                format!("`{ident}` is not a capture, a `let` or a parameter of this mod"),
            );
        };
        let name = &self.name;
        Ok(match var {
            Var::Local(ty) => Typed {
                ty: *ty,
                host: quote!(#ident),
                cube: quote!(#ident),
                tangent: if *ty == Ty::Float {
                    let t = tangent_name(ident);
                    quote!(#t)
                } else {
                    zero()
                },
            },
            Var::Score => Typed {
                ty: Ty::Float,
                host: quote!(__s),
                cube: quote!(__s),
                tangent: quote!(__t),
            },
            Var::Scalar { elem, slot } => {
                let host = match elem {
                    Elem::F32 => quote!(<N as ::gqa::dsl::__private::Real>::from_f32(self.#ident)),
                    _ => quote!((self.#ident as i64)),
                };
                let cube = match elem {
                    Elem::F32 => quote!(::gqa::dsl::cube::read_float(
                        __aux,
                        0i32,
                        comptime!(__base + #slot)
                    )),
                    _ => quote!(::gqa::dsl::cube::read_int(
                        __aux,
                        0i32,
                        comptime!(__base + #slot)
                    )),
                };
                let _ = name;
                Typed {
                    ty: elem.ty(),
                    host,
                    cube,
                    tangent: zero(),
                }
            }
            Var::Table { .. } => {
                return err(
                    ident.span(),
                    format!("`{ident}` is a table: index it, `{ident}[i]`"),
                );
            }
            Var::Position => {
                return err(
                    ident.span(),
                    format!(
                        "`{ident}` is the position: use a field (`{ident}.b`, `.h`, `.q`, `.k`, `.seq_q`, `.seq_k`)"
                    ),
                );
            }
        })
    }

    fn field(&self, f: &syn::ExprField) -> syn::Result<Typed> {
        let is_position = matches!(&*f.base, Expr::Path(p) if p.path.get_ident().is_some_and(|i| matches!(self.vars.get(&i.to_string()), Some(Var::Position))));
        if !is_position {
            return err(
                f.span(),
                "fields are read only from the position (`at.q`, `at.k`, …)",
            );
        }
        let syn::Member::Named(member) = &f.member else {
            return err(
                f.member.span(),
                "the position's fields are b, h, q, k, seq_q, seq_k",
            );
        };
        let (host, cube) = match member.to_string().as_str() {
            "b" => (quote!(__at.b), quote!(__b)),
            "h" => (quote!(__at.h), quote!(__h)),
            "q" => (quote!(__at.q), quote!(__q)),
            "k" => (quote!(__at.k), quote!(__k)),
            "seq_q" => (quote!(__at.seq_q), quote!(__seq_q)),
            "seq_k" => (quote!(__at.seq_k), quote!(__seq_k)),
            _ => {
                return err(
                    member.span(),
                    "the position's fields are b, h, q, k, seq_q, seq_k",
                );
            }
        };
        Ok(Typed {
            ty: Ty::Int,
            host,
            cube,
            tangent: zero(),
        })
    }

    fn index(&self, i: &syn::ExprIndex) -> syn::Result<Typed> {
        let table = match &*i.expr {
            Expr::Path(p) => {
                p.path
                    .get_ident()
                    .and_then(|id| match self.vars.get(&id.to_string()) {
                        Some(Var::Table { elem, slot }) => Some((id.clone(), *elem, *slot)),
                        _ => None,
                    })
            }
            _ => None,
        };
        let Some((ident, elem, slot)) = table else {
            return err(
                i.expr.span(),
                "only tables (`&Aux<…>` captures) can be indexed",
            );
        };
        let index = self.expr(&i.index)?;
        if index.ty != Ty::Int {
            return err(
                i.index.span(),
                format!("a table index is an integer, this is {}", index.ty.name()),
            );
        }
        let (mod_name, table_name) = (&self.name, ident.to_string());
        let (h, c) = (&index.host, &index.cube);
        let (host, cube) = match elem {
            Elem::F32 => (
                quote!(::gqa::dsl::__private::read_float::<N>(&self.#ident, #h, #mod_name, #table_name)),
                quote!(::gqa::dsl::cube::read_float(__aux, #c, comptime!(__base + #slot))),
            ),
            _ => (
                quote!(::gqa::dsl::__private::read_int(&self.#ident, #h, #mod_name, #table_name)),
                quote!(::gqa::dsl::cube::read_int(__aux, #c, comptime!(__base + #slot))),
            ),
        };
        Ok(Typed {
            ty: elem.ty(),
            host,
            cube,
            tangent: zero(),
        })
    }

    fn unary(&self, u: &syn::ExprUnary) -> syn::Result<Typed> {
        let inner = self.expr(&u.expr)?;
        let (h, c, t) = (&inner.host, &inner.cube, &inner.tangent);
        match (&u.op, inner.ty) {
            (UnOp::Neg(_), Ty::Int) => Ok(Typed {
                ty: Ty::Int,
                host: quote!((-#h)),
                cube: quote!((0i32 - #c)),
                tangent: zero(),
            }),
            (UnOp::Neg(_), Ty::Float) => Ok(Typed {
                ty: Ty::Float,
                host: quote!((-#h)),
                cube: quote!((-#c)),
                tangent: quote!((-#t)),
            }),
            (UnOp::Not(_), Ty::Bool) => Ok(Typed {
                ty: Ty::Bool,
                host: quote!((!#h)),
                cube: quote!((!#c)),
                tangent: zero(),
            }),
            (UnOp::Neg(_), ty) | (UnOp::Not(_), ty) => err(
                u.op.span(),
                format!("this operator does not apply to {}", ty.name()),
            ),
            (op, _) => err(op.span(), "this operator is not part of the language"),
        }
    }

    fn binary(&self, b: &syn::ExprBinary) -> syn::Result<Typed> {
        let (l, r) = (self.expr(&b.left)?, self.expr(&b.right)?);
        let op = &b.op;
        let span = op.span();
        let arithmetic = matches!(
            op,
            BinOp::Add(_) | BinOp::Sub(_) | BinOp::Mul(_) | BinOp::Div(_) | BinOp::Rem(_)
        );
        let comparison = matches!(
            op,
            BinOp::Eq(_) | BinOp::Ne(_) | BinOp::Lt(_) | BinOp::Le(_) | BinOp::Gt(_) | BinOp::Ge(_)
        );
        let logic = matches!(op, BinOp::And(_) | BinOp::Or(_));
        let ty = if arithmetic {
            if l.ty != r.ty || l.ty == Ty::Bool {
                return err(
                    span,
                    format!(
                        "arithmetic needs two integers or two floats, got {} and {} (cast integers with `as f32`)",
                        l.ty.name(),
                        r.ty.name()
                    ),
                );
            }
            l.ty
        } else if comparison {
            let ordered = !matches!(op, BinOp::Eq(_) | BinOp::Ne(_));
            if l.ty != r.ty || (ordered && l.ty == Ty::Bool) {
                return err(
                    span,
                    format!("cannot compare {} with {}", l.ty.name(), r.ty.name()),
                );
            }
            Ty::Bool
        } else if logic {
            if l.ty != Ty::Bool || r.ty != Ty::Bool {
                return err(
                    span,
                    format!(
                        "`&&` and `||` need two bools, got {} and {}",
                        l.ty.name(),
                        r.ty.name()
                    ),
                );
            }
            Ty::Bool
        } else {
            return err(
                span,
                "this operator is not part of the language (no assignment, no bit operations)",
            );
        };
        let (lh, lc, rh, rc) = (&l.host, &l.cube, &r.host, &r.cube);
        let (lt, rt) = (&l.tangent, &r.tangent);
        let chain = quote!(::gqa::dsl::cube::chain);
        // The host `Dual`'s rules (`src/dsl/real.rs`).
        let tangent = match op {
            _ if ty != Ty::Float => zero(),
            BinOp::Add(_) => quote!((#lt + #rt)),
            BinOp::Sub(_) => quote!((#lt - #rt)),
            BinOp::Mul(_) => quote!((#chain(#lt, #rc) + #chain(#rt, #lc))),
            BinOp::Div(_) => {
                quote!((#chain(#lt, 1.0f32 / #rc) - #chain(#rt, #lc / (#rc * #rc))))
            }
            // `a % b = a − trunc(a / b)·b`.
            _ => quote!((#lt - #chain(#rt, ::gqa::dsl::cube::trunc(#lc / #rc)))),
        };
        // Integer `/` and `%` in kernels through helpers defined for every divisor
        // (`div_int`, `rem_int`: a zero divisor gives 0, and GLSL's `%` is not Rust's for
        // negative operands).
        let cube = match op {
            BinOp::Div(_) if ty == Ty::Int => {
                quote_spanned!(span=> ::gqa::dsl::cube::div_int(#lc, #rc))
            }
            BinOp::Rem(_) if ty == Ty::Int => {
                quote_spanned!(span=> ::gqa::dsl::cube::rem_int(#lc, #rc))
            }
            _ => quote_spanned!(span=> (#lc #op #rc)),
        };
        Ok(Typed {
            ty,
            host: quote_spanned!(span=> (#lh #op #rh)),
            cube,
            tangent,
        })
    }

    fn cast(&self, c: &syn::ExprCast) -> syn::Result<Typed> {
        let inner = self.expr(&c.expr)?;
        let target = match &*c.ty {
            Type::Path(p) if p.path.is_ident("f32") || p.path.is_ident("f64") => Ty::Float,
            Type::Path(p) if p.path.is_ident("i32") || p.path.is_ident("i64") => Ty::Int,
            other => {
                return err(
                    other.span(),
                    "casts go to `f32` (from an integer) or `i32` (from a float)",
                );
            }
        };
        let (h, cu) = (&inner.host, &inner.cube);
        let (host, cube) = match (inner.ty, target) {
            (Ty::Int, Ty::Float) => (
                quote!(<N as ::gqa::dsl::__private::Real>::from_int(#h)),
                quote!(f32::cast_from(#cu)),
            ),
            (Ty::Float, Ty::Int) => (
                quote!(<N as ::gqa::dsl::__private::Real>::to_int(#h)),
                quote!(i32::cast_from(#cu)),
            ),
            (a, b) if a == b => (h.clone(), cu.clone()),
            (a, _) => return err(c.span(), format!("cannot cast {}", a.name())),
        };
        // A float cast to a float keeps its tangent; one from an integer has none.
        let tangent = if inner.ty == Ty::Float && target == Ty::Float {
            inner.tangent.clone()
        } else {
            zero()
        };
        Ok(Typed {
            ty: target,
            host,
            cube,
            tangent,
        })
    }

    fn call(&self, c: &syn::ExprCall) -> syn::Result<Typed> {
        let Expr::Path(p) = &*c.func else {
            return err(c.func.span(), "only the language's functions can be called");
        };
        let Some(f) = p.path.get_ident() else {
            return err(
                p.span(),
                "only the language's functions can be called: min max abs exp ln tanh sqrt floor clamp",
            );
        };
        let args = c
            .args
            .iter()
            .map(|a| self.expr(a))
            .collect::<syn::Result<Vec<_>>>()?;
        let name = f.to_string();
        let arity = |n: usize| -> syn::Result<()> {
            if args.len() == n {
                Ok(())
            } else {
                err(
                    c.span(),
                    format!(
                        "`{name}` takes {n} argument{}",
                        if n == 1 { "" } else { "s" }
                    ),
                )
            }
        };
        let same = |ty_ok: &dyn Fn(Ty) -> bool| -> syn::Result<Ty> {
            let ty = args[0].ty;
            if args.iter().any(|a| a.ty != ty) || !ty_ok(ty) {
                return err(
                    c.span(),
                    format!(
                        "`{name}` takes {}",
                        if ty_ok(Ty::Int) {
                            "integers or floats, all of one kind"
                        } else {
                            "floats"
                        }
                    ),
                );
            }
            Ok(ty)
        };
        let h: Vec<&TokenStream> = args.iter().map(|a| &a.host).collect();
        let cu: Vec<&TokenStream> = args.iter().map(|a| &a.cube).collect();
        let t: Vec<&TokenStream> = args.iter().map(|a| &a.tangent).collect();
        let chain = quote!(::gqa::dsl::cube::chain);
        let numeric = |t: Ty| t != Ty::Bool;
        let float = |t: Ty| t == Ty::Float;
        let real = quote!(<N as ::gqa::dsl::__private::Real>);
        // The tangents follow the host `Dual`'s rules (`src/dsl/real.rs`): `min` keeps the first
        // on ties, `abs` negates below 0, `exp`'s is not chained.
        let (ty, host, cube, tangent) = match name.as_str() {
            "min" | "max" => {
                arity(2)?;
                let ty = same(&numeric)?;
                let (a, b, ca, cb) = (h[0], h[1], cu[0], cu[1]);
                let f = format_ident!("{}", name);
                let host = if ty == Ty::Int {
                    quote!(::core::cmp::#f(#a, #b))
                } else {
                    quote!(#real::#f(#a, #b))
                };
                let (ta, tb) = (t[0], t[1]);
                let second = if name == "min" {
                    quote!(#cb < #ca)
                } else {
                    quote!(#cb > #ca)
                };
                let tangent = if ty == Ty::Float {
                    quote!(select(#second, #tb, #ta))
                } else {
                    zero()
                };
                (ty, host, quote!(#f(#ca, #cb)), tangent)
            }
            "clamp" => {
                arity(3)?;
                let ty = same(&numeric)?;
                let (x, lo, hi, cx, clo, chi) = (h[0], h[1], h[2], cu[0], cu[1], cu[2]);
                let host = if ty == Ty::Int {
                    quote!(::core::cmp::min(::core::cmp::max(#x, #lo), #hi))
                } else {
                    quote!(#real::min(#real::max(#x, #lo), #hi))
                };
                // `min(max(x, lo), hi)`, each keeping its first argument on ties.
                let (tx, tlo, thi) = (t[0], t[1], t[2]);
                let tangent = if ty == Ty::Float {
                    let raised = quote!(max(#cx, #clo));
                    quote!(select(#chi < #raised, #thi, select(#clo > #cx, #tlo, #tx)))
                } else {
                    zero()
                };
                (ty, host, quote!(min(max(#cx, #clo), #chi)), tangent)
            }
            "abs" => {
                arity(1)?;
                let ty = same(&numeric)?;
                let (x, cx) = (h[0], cu[0]);
                if ty == Ty::Int {
                    (
                        ty,
                        quote!(i64::abs(#x)),
                        quote!(::gqa::dsl::cube::abs_int(#cx)),
                        zero(),
                    )
                } else {
                    let tx = t[0];
                    (
                        ty,
                        quote!(#real::abs(#x)),
                        quote!((#cx).abs()),
                        quote!(select(#cx < 0.0f32, -#tx, #tx)),
                    )
                }
            }
            "exp" | "ln" | "tanh" => {
                arity(1)?;
                same(&float)?;
                let f = format_ident!("{}", name);
                let (x, cx, tx) = (h[0], cu[0], t[0]);
                let value = quote!(::gqa::dsl::cube::#f(#cx));
                let tangent = match name.as_str() {
                    "exp" => quote!((#tx * #value)),
                    "ln" => quote!(#chain(#tx, 1.0f32 / #cx)),
                    _ => quote!(#chain(#tx, 1.0f32 - #value * #value)),
                };
                (Ty::Float, quote!(#real::#f(#x)), value, tangent)
            }
            "sqrt" | "floor" => {
                arity(1)?;
                same(&float)?;
                let f = format_ident!("{}", name);
                let (x, cx, tx) = (h[0], cu[0], t[0]);
                let tangent = if name == "sqrt" {
                    quote!(#chain(#tx, 0.5f32 / (#cx).sqrt()))
                } else {
                    zero()
                };
                (
                    Ty::Float,
                    quote!(#real::#f(#x)),
                    quote!((#cx).#f()),
                    tangent,
                )
            }
            _ => {
                return err(
                    f.span(),
                    format!(
                        "`{name}` is not a function of the language: min max abs exp ln tanh sqrt floor clamp"
                    ),
                );
            }
        };
        Ok(Typed {
            ty,
            host,
            cube,
            tangent,
        })
    }

    fn if_else(&self, i: &syn::ExprIf) -> syn::Result<Typed> {
        let cond = self.expr(&i.cond)?;
        if cond.ty != Ty::Bool {
            return err(
                i.cond.span(),
                format!("a condition is a bool, this is {}", cond.ty.name()),
            );
        }
        let Some((_, otherwise)) = &i.else_branch else {
            return err(
                i.span(),
                "an `if` is an expression here: it needs an `else`",
            );
        };
        let then = self.block_expr(&i.then_branch)?;
        let other = match &**otherwise {
            Expr::Block(b) if b.label.is_none() => self.block_expr(&b.block)?,
            Expr::If(nested) => self.if_else(nested)?,
            e => return err(e.span(), "an `else` holds a block or another `if`"),
        };
        if then.ty != other.ty {
            return err(
                i.span(),
                format!(
                    "the branches are {} and {}",
                    then.ty.name(),
                    other.ty.name()
                ),
            );
        }
        let (ch, cc, th, tc, oh, oc) = (
            &cond.host,
            &cond.cube,
            &then.host,
            &then.cube,
            &other.host,
            &other.cube,
        );
        let (tt, ot) = (&then.tangent, &other.tangent);
        Ok(Typed {
            ty: then.ty,
            host: quote!((if #ch { #th } else { #oh })),
            cube: quote!(select(#cc, #tc, #oc)),
            tangent: quote!(select(#cc, #tt, #ot)),
        })
    }

    fn block_expr(&self, block: &syn::Block) -> syn::Result<Typed> {
        match block.stmts.as_slice() {
            [Stmt::Expr(e, None)] => self.expr(e),
            _ => err(block.span(), "an `if` branch holds one expression"),
        }
    }
}

fn unsupported_statement(e: &Expr) -> String {
    let what = match e {
        Expr::ForLoop(_) | Expr::While(_) | Expr::Loop(_) => "loops are",
        Expr::Return(_) => "`return` is",
        Expr::Break(_) | Expr::Continue(_) => "`break` and `continue` are",
        Expr::Closure(_) => "closures are",
        Expr::Assign(_) => "assignments are",
        Expr::Macro(_) => "macros are",
        Expr::Match(_) => "`match` is",
        Expr::Block(_) | Expr::Unsafe(_) => "nested blocks are",
        Expr::Reference(_) => "references are",
        Expr::Tuple(_) | Expr::Array(_) => "tuples and arrays are",
        _ => "this construct is",
    };
    format!(
        "{what} not part of the mod language (a body is `let`s and one expression; see gqa::dsl)"
    )
}
