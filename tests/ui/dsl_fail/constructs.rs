// Statements outside the mod language: loops, `return`, `match`, closures, mutation.
use gqa::dsl::Position;

#[gqa::mask_mod]
fn looping(at: Position) -> bool {
    for _ in 0..3 {}
    true
}

#[gqa::mask_mod]
fn early(at: Position) -> bool {
    return at.q >= at.k
}

#[gqa::score_mod]
fn matching(s: f32, at: Position) -> f32 {
    match at.h {
        0 => s,
        _ => s * 2.0,
    }
}

#[gqa::score_mod]
fn mutating(s: f32, at: Position) -> f32 {
    let mut t = s;
    t
}

fn main() {}
