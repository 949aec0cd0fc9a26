// Partials are typed by their configuration: a partial of Llama-3-8B's attention (32/8/128)
// does not merge with one of a 32/4/128 attention, even over the same keys' positions.
use gqa::cache::{Float32, Layout};
use gqa::partial::Partial;
use ndarray::Array4;

fn main() {
    let llama = gqa::Gqa::<32, 8, 128>::new().causal();
    let other = gqa::Gqa::<32, 4, 128>::new().causal();
    let layout = Layout::Paged { page_size: 16, pages: 8 };
    let mut a = llama.try_new_cache::<Float32>(layout).unwrap();
    let mut b = other.try_new_cache::<Float32>(layout).unwrap();
    let (sa, sb) = (a.try_add_sequence().unwrap(), b.try_add_sequence().unwrap());
    let q = Array4::<f32>::zeros((1, 32, 1, 128));
    let first = llama.try_decode_partial_oracle(q.view(), &a, &[sa], 0..8).unwrap();
    let second = other.try_decode_partial_oracle(q.view(), &b, &[sb], 8..16).unwrap();
    let _ = Partial::try_merge(&[first, second]);
}
