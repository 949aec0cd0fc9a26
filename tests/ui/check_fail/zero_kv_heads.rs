// A configuration needs at least one key/value head.
fn main() {
    let _attention = gqa::Gqa::<8, 0, 64>::new();
}
