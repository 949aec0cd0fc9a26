// Head dims start at 1.
fn main() {
    let _attention = gqa::Mha::<8, 0>::new();
}
