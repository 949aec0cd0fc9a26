// A configuration listed for `gqa::dispatch!` must obey the rule, even where the body does not
// name the attention type.
fn main() {
    let _n = gqa::dispatch!((32, 6, 128), [(32, 8, 128), (32, 6, 128)], |HQ, HKV, D| HQ + HKV + D);
}
