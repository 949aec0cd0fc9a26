// Generic code that uses a configuration must pass the rule on (`where Rule: Supported<HQ, HKV,
// D>`); without it, the function itself does not type-check.
fn group_size<const HQ: usize, const HKV: usize>() -> usize {
    gqa::Gqa::<HQ, HKV, 64>::GROUP
}

fn main() {
    println!("{}", group_size::<32, 8>());
}
