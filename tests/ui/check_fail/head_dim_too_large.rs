// Head dims end at 256.
fn main() {
    let _attention = gqa::Mqa::<8, 512>::new();
}
