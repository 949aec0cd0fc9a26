// A configuration needs at least one query head.
fn main() {
    let _attention = gqa::Attention::<0, 1, 64>::new();
}
