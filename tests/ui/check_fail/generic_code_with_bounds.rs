// Generic code that names the bounds passes them on: the error is at the instantiation, with the
// numbers.
use gqa::heads::{Rule, Supported};

fn layer<const HQ: usize, const HKV: usize>() -> gqa::Gqa<HQ, HKV, 64>
where
    Rule: Supported<HQ, HKV, 64>,
{
    gqa::Gqa::<HQ, HKV, 64>::new().causal()
}

fn main() {
    let _attention = layer::<32, 6>();
}
