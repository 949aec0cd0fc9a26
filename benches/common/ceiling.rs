//! The GEMM ceiling the CPU benches measure against: the `gemm` crate's single-precision
//! product on a pool of the backend's size (the `cpu` feature's `gemm` and `rayon`).

use ndarray::{Array4, Axis};
use rayon::prelude::*;

/// Runs `f` on a rayon pool of `threads` threads (one pool per size, kept: the CPU backend's
/// own pool is private).
pub fn install<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    thread_local! {
        static POOLS: std::cell::RefCell<Vec<(usize, std::sync::Arc<rayon::ThreadPool>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    let pool = POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        if let Some((_, pool)) = pools.iter().find(|(n, _)| *n == threads) {
            return pool.clone();
        }
        let pool = std::sync::Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap(),
        );
        pools.push((threads, pool.clone()));
        pool
    });
    pool.install(f)
}

/// One `[L, D] × [D, L]` product per (batch entry, query head) of `q: [B, HQ, L, D]` against
/// its KV head's keys in `k: [B, HKV, L, D]` (both standard layout), the heads divided evenly
/// over `out.len()` threads, thread `t` writing `out[t]` (`L · L` each): `2·B·HQ·L²·D` FLOPs.
pub fn qk_products(q: &Array4<f32>, k: &Array4<f32>, out: &mut [Vec<f32>]) {
    let [batch, q_heads, len, dim] = [0, 1, 2, 3].map(|axis| q.len_of(Axis(axis)));
    let group = q_heads / k.len_of(Axis(1));
    let heads = batch * q_heads;
    let threads = out.len();
    let per_thread = heads.div_ceil(threads);
    assert!(q.is_standard_layout() && k.is_standard_layout());
    assert!(out.iter().all(|o| o.len() >= len * len));
    install(threads, || {
        out.par_iter_mut().enumerate().for_each(|(t, dst)| {
            for head in t * per_thread..((t + 1) * per_thread).min(heads) {
                let (b, h) = (head / q_heads, head % q_heads);
                let lhs = q.index_axis(Axis(0), b);
                let lhs = lhs.index_axis(Axis(0), h);
                let rhs = k.index_axis(Axis(0), b);
                let rhs = rhs.index_axis(Axis(0), h / group);
                // SAFETY: lhs is [len, D] (strides D, 1) and rhs^T is [D, len] (strides 1, D),
                // both inside standard-layout arrays (asserted); dst holds len × len.
                unsafe {
                    gemm::gemm(
                        len,
                        len,
                        dim,
                        dst.as_mut_ptr(),
                        1,
                        len as isize,
                        false,
                        lhs.as_ptr(),
                        1,
                        dim as isize,
                        rhs.as_ptr(),
                        dim as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
    });
}
