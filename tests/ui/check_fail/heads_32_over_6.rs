// 32 query heads cannot be split into 6 equal groups.
fn main() {
    let _attention = gqa::Gqa::<32, 6, 128>::new();
}
