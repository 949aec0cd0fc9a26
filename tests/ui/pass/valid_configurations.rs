// Valid configurations compile, build and run: MHA, GQA with groups 2..8 (3 and 5 included), MQA,
// the largest table entries, and head dims that are not powers of two.
use gqa::heads::{Rule, Supported};
use gqa::{Attention, DType, Gqa, Mha, Mqa};

fn layer<const HQ: usize, const HKV: usize, const D: usize>() -> Attention<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    Attention::new().causal()
}

fn group_size<const HQ: usize, const HKV: usize>() -> usize
where
    Rule: Supported<HQ, HKV, 64>,
{
    Gqa::<HQ, HKV, 64>::GROUP
}

fn main() {
    assert_eq!(Mha::<32, 128>::new().spec().group_size(), 1);
    assert_eq!(Gqa::<32, 8, 128>::new().spec().group_size(), 4);
    assert_eq!(Gqa::<6, 2, 96>::new().spec().group_size(), 3);
    assert_eq!(Gqa::<20, 4, 80>::new().spec().group_size(), 5);
    assert_eq!(Mqa::<16, 256>::new().spec().group_size(), 16);
    assert_eq!(Gqa::<256, 1, 1>::new().spec().group_size(), 256);
    assert_eq!(Mha::<256, 256>::new().spec().group_size(), 1);
    assert_eq!(layer::<12, 4, 80>().spec().kv_heads(), 4);
    assert_eq!(group_size::<40, 8>(), 5);
    let gqa = Gqa::<32, 8, 128>::default().kv_cache(DType::BF16);
    assert_eq!(gqa.mha_equivalent().bytes(32, 1, 4096), 4 * gqa.bytes(32, 1, 4096));
}
