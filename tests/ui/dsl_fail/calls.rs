// Calls outside the whitelist, method calls, signatures the language does not have.
use gqa::dsl::{Aux, Position};

#[gqa::score_mod]
fn power(s: f32, at: Position) -> f32 {
    powf(s, 2.0)
}

#[gqa::score_mod]
fn method(s: f32, at: Position) -> f32 {
    s.powi(2)
}

#[gqa::mask_mod]
fn no_position(q: i32, k: i32) -> bool {
    q >= k
}

#[gqa::mask_mod]
fn vector_capture(ids: Vec<i32>, at: Position) -> bool {
    true
}

#[gqa::mask_mod]
fn float_index(ids: &Aux<i32>, at: Position) -> bool {
    ids[at.q as f32] == 0
}

fn main() {}
