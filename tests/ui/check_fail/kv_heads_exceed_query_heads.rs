// More KV heads than query heads cannot be shared evenly.
fn main() {
    let _attention = gqa::Gqa::<4, 8, 64>::new();
}
