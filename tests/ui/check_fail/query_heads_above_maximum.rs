// The table of valid head splits stops at 256 query heads; the note states the limit.
fn main() {
    let _attention = gqa::Mha::<512, 64>::new();
}
