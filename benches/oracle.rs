//! The f64 oracle's forward per configuration of the shared list (`tests/common/configs.rs`),
//! one benchmark per configuration, named `oracle_forward/<config>`. The oracle is never
//! optimised: this is the baseline the fast backends are measured against, not a target.
//!
//! Throughput is reported in elements = FLOPs of the two products (`4 · B · HQ · Lq · Lk · D`,
//! no mask), so criterion's "elem/s" reads as FLOP/s.

use criterion::{BenchmarkId, Criterion, Throughput};
use gqa::{Attention, oracle};
use ndarray::Array4;
use std::hint::black_box;

#[path = "../tests/common/configs.rs"]
#[macro_use]
mod configs;

const BATCH: usize = 1;
const SEQ: usize = 64;

macro_rules! oracle_bench {
    ($name:ident, $hq:literal, $hkv:literal, $d:literal) => {
        paste::paste! {
            fn [<oracle_forward_ $name>](c: &mut Criterion) {
                let attention = Attention::<$hq, $hkv, $d>::new();
                // Inputs are allocated once, outside the timed closure.
                let q = Array4::<f32>::from_elem((BATCH, $hq, SEQ, $d), 0.5);
                let kv = Array4::<f32>::from_elem((BATCH, $hkv, SEQ, $d), 0.25);
                let mut group = c.benchmark_group("oracle_forward");
                group.sample_size(10);
                group.throughput(Throughput::Elements((4 * BATCH * $hq * SEQ * SEQ * $d) as u64));
                group.bench_function(BenchmarkId::from_parameter(stringify!($name)), |b| {
                    b.iter(|| oracle::forward(attention.spec(), black_box(q.view()), kv.view(), kv.view()))
                });
                group.finish();
            }
        }
    };
}

for_each_config!(oracle_bench);

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    macro_rules! run {
        ($name:ident, $($rest:tt)*) => {
            paste::paste! { [<oracle_forward_ $name>](&mut criterion); }
        };
    }
    for_each_config!(run);
    criterion.final_summary();
}
