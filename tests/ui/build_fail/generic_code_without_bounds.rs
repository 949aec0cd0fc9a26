// Generic code that never names the bounds type-checks (cargo check passes), but the const
// backstop fails the build, naming the instantiation `Attention::<32, 6, 64>`.
fn group_size<const HQ: usize, const HKV: usize>() -> usize {
    gqa::Gqa::<HQ, HKV, 64>::GROUP
}

fn main() {
    println!("{}", group_size::<32, 6>());
}
