// Mods written in a user crate compile and run on the host in a build without any GPU
// runtime (the kernel half of each mod is left out with gqa's features).
use gqa::dsl::{Aux, MaskMod, Position, ScoreMod};

/// Packed documents.
#[gqa::mask_mod]
fn same_document(doc: &Aux<u32>, at: Position) -> bool {
    doc[at.q] == doc[at.k]
}

#[gqa::score_mod]
fn rel_bias(bias: &Aux<f32>, s: f32, at: Position) -> f32 {
    s + bias[at.h * 64 + min(abs(at.q - at.k), 63)]
}

fn main() {
    let mask = same_document(Aux::new(vec![0u32, 0, 1])) & !same_document(Aux::new(vec![5u32, 6, 6]));
    let at = Position { b: 0, h: 0, q: 1, k: 0, seq_q: 3, seq_k: 3 };
    assert!(mask.visible(at));
    let bias = rel_bias(Aux::new(vec![0.5f32; 64]));
    assert_eq!(bias.apply(1.0f64, at), 1.5);
    assert_eq!(bias.derivative(1.0, at), 1.0);
}
