// A KV cache is typed by KV heads and head dim: Llama-3-8B's attention (32 query heads, 8 KV
// heads, D 128) cannot decode against a cache built for 4 KV heads.
use gqa::cache::{Float16, KvCache, Layout};
use ndarray::Array4;

fn main() {
    let attention = gqa::Gqa::<32, 8, 128>::new().causal();
    let mut cache = KvCache::<4, 128, Float16>::new(Layout::Paged { page_size: 16, pages: 8 });
    let seq = cache.try_add_sequence().unwrap();
    let q = Array4::<f32>::zeros((1, 32, 1, 128));
    let _ = attention.try_decode_oracle(q.view(), &cache, &[seq]);
}
