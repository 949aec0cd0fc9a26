// Values outside the mod language: infinities (a path, a literal past f32), integers and
// floats mixed without a cast, a mask that does not return a bool.
use gqa::dsl::Position;

#[gqa::score_mod]
fn infinite_path(s: f32, at: Position) -> f32 {
    if at.q < at.k { f32::NEG_INFINITY } else { s }
}

#[gqa::score_mod]
fn infinite_literal(s: f32, at: Position) -> f32 {
    s - 1e39
}

#[gqa::score_mod]
fn mixed(s: f32, at: Position) -> f32 {
    s - at.q
}

#[gqa::mask_mod]
fn not_a_bool(at: Position) -> bool {
    at.q - at.k
}

fn main() {}
