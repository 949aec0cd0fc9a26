// An invalid configuration is not a type: reading its constants fails `cargo check` too.
type Broken = gqa::Gqa<32, 6, 128>;

fn main() {
    println!("{}", Broken::GROUP);
}
