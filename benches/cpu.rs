//! The CPU backend against the machine's limits, measured in the same run:
//! `cargo bench --bench cpu`.
//!
//! **Prefill** (causal, f32): batch `GQA_CPU_BATCHES` (default 1,4) × length `GQA_CPU_LENGTHS`
//! (default 512,1024,2048,4096) × {GQA 32/8, MHA 32/32, MQA 32/1} at D 128, on 1 and 2
//! threads. FLOPs = 2·B·HQ·L²·D (the two products, halved by the causal mask). The ceiling is
//! a single-precision GEMM of the same FLOPs on the same number of threads, timed in the same
//! run: per query head `[L, D] × [D, L]` (the head's unmasked Q·Kᵀ) by the `gemm` crate, the
//! heads divided evenly over the threads. Outputs preallocated ([`Cpu::try_forward_into`], one
//! GEMM output per thread); median of `GQA_BENCH_RUNS` (default 3), attention and GEMM
//! alternating run by run.
//!
//! **Decode** (1 query, f32 cache, contiguous): batch `GQA_CPU_DECODE_BATCHES` (default 1,8) ×
//! Lk `GQA_CPU_DECODE_LENGTHS` (default 1024,4096,16384) × the three configurations, 1 and 2
//! threads, cache cold: the timed calls rotate over enough copies of the cache to exceed twice
//! the last-level cache. GB/s of K/V read, against a plain streaming read (a sum) of the same
//! copies' bytes on the same threads in the same run; and the GQA/MQA speedup over MHA next to
//! its ideal. Each step runs the three configurations' decodes and reads in turn, so that a
//! shared machine's drift hits all of them alike. The decode's own allocations (its outputs,
//! the split states) are inside the timed call.

use std::hint::black_box;
use std::time::Instant;

use gqa::cache::{Float32, KvCache, Layout, SeqId};
use gqa::cpu::Cpu;
use gqa::heads::{Rule, Supported};
use gqa::{Attention, AttentionSpec};
use ndarray::{Array3, Array4, Axis};
use rayon::prelude::*;

mod common;
use common::{ceiling, env_list, env_usize};

const HQ: usize = 32;
const D: usize = 128;

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn data(shape: (usize, usize, usize, usize), phase: usize) -> Array4<f32> {
    Array4::from_shape_fn(shape, |(b, h, i, d)| {
        (((b * 7 + h * 13 + i * 3 + d + phase) % 97) as f32 / 48.0 - 1.0) * 0.5
    })
}

/// Seconds of one prefill and of the GEMM ceiling of the same FLOPs (medians; the two
/// alternate run by run, so that a shared machine's drift hits both alike).
fn prefill(cpu: &Cpu, spec: &AttentionSpec, batch: usize, len: usize, runs: usize) -> (f64, f64) {
    let hkv = spec.kv_heads();
    let q = data((batch, HQ, len, D), 0);
    let k = data((batch, hkv, len, D), 1);
    let v = data((batch, hkv, len, D), 2);
    let mut o = Array4::<f32>::from_elem((batch, HQ, len, D), 1.0);
    let mut lse = Array3::<f32>::from_elem((batch, HQ, len), 1.0);
    // The ceiling: per head [L, D] × [D, L], one output buffer per thread.
    let mut out: Vec<Vec<f32>> = (0..cpu.threads())
        .map(|_| vec![0.0f32; len * len])
        .collect();
    let (mut attention, mut gemm) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let start = Instant::now();
        cpu.try_forward_into(
            spec,
            (q.view(), k.view(), v.view()),
            o.view_mut(),
            lse.view_mut(),
        )
        .unwrap();
        attention.push(start.elapsed().as_secs_f64());
        black_box(&o);
        let start = Instant::now();
        ceiling::qk_products(&q, &k, &mut out);
        gemm.push(start.elapsed().as_secs_f64());
        black_box(&out);
    }
    (median(attention), median(gemm))
}

/// The last-level cache's size in bytes (Linux sysfs), or 64 MiB.
fn last_level_cache() -> usize {
    (0..8)
        .rev()
        .find_map(|index| {
            let path = format!("/sys/devices/system/cpu/cpu0/cache/index{index}/size");
            let text = std::fs::read_to_string(path).ok()?;
            let text = text.trim();
            let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
            let n: usize = number.parse().ok()?;
            Some(match unit {
                "K" => n << 10,
                "M" => n << 20,
                "G" => n << 30,
                _ => n,
            })
        })
        .unwrap_or(64 << 20)
}

/// One configuration's decode benchmark: copies of a filled f32 cache, enough to exceed twice
/// the last-level cache, read in rotation.
trait DecodeCase {
    /// Seconds of one decode step against copy `step`.
    fn decode(&self, step: usize) -> f64;
    /// Seconds of a streaming read (a sum) of the K/V bytes of copy `step`.
    fn stream(&self, step: usize) -> f64;
    /// The K/V bytes one step reads.
    fn bytes(&self) -> usize;
    fn copies(&self) -> usize;
}

struct Decode<'a, const HKV: usize>
where
    Rule: Supported<HQ, HKV, D> + Supported<HKV, HKV, D>,
{
    cpu: &'a Cpu,
    attention: Attention<HQ, HKV, D>,
    caches: Vec<KvCache<HKV, D, Float32>>,
    seqs: Vec<SeqId>,
    q: Array4<f32>,
    bytes: usize,
}

impl<'a, const HKV: usize> Decode<'a, HKV>
where
    Rule: Supported<HQ, HKV, D> + Supported<HKV, HKV, D>,
{
    fn new(cpu: &'a Cpu, batch: usize, len: usize) -> Self {
        let attention = Attention::<HQ, HKV, D>::new().causal();
        let mut cache = attention
            .try_new_cache::<Float32>(Layout::Contiguous {
                sequences: batch,
                capacity: len,
            })
            .unwrap();
        let seqs: Vec<SeqId> = (0..batch)
            .map(|_| cache.try_add_sequence().unwrap())
            .collect();
        for (n, &seq) in seqs.iter().enumerate() {
            let mut done = 0;
            while done < len {
                let count = 1024.min(len - done);
                let x = data((1, HKV, count, D), n + done).index_axis_move(Axis(0), 0);
                cache.try_append(seq, x.view(), x.view()).unwrap();
                done += count;
            }
        }
        let bytes = 2 * batch * len * HKV * D * 4;
        let copies = (2 * last_level_cache()).div_ceil(bytes).max(1);
        let caches = (0..copies).map(|_| cache.clone()).collect();
        Decode {
            cpu,
            attention,
            caches,
            seqs,
            q: data((batch, HQ, 1, D), 5),
            bytes,
        }
    }
}

impl<const HKV: usize> DecodeCase for Decode<'_, HKV>
where
    Rule: Supported<HQ, HKV, D> + Supported<HKV, HKV, D>,
{
    fn decode(&self, step: usize) -> f64 {
        let cache = &self.caches[step % self.caches.len()];
        let start = Instant::now();
        let out = self
            .attention
            .try_decode_cpu(self.cpu, self.q.view(), cache, &self.seqs)
            .unwrap();
        let time = start.elapsed().as_secs_f64();
        black_box(out);
        time
    }

    fn stream(&self, step: usize) -> f64 {
        let (k, v, _, _) = self.caches[step % self.caches.len()].raw();
        let start = Instant::now();
        let sum: f32 = ceiling::install(self.cpu.threads(), || {
            [k, v]
                .par_iter()
                .flat_map(|words| words.par_chunks(16 * 1024))
                .map(|chunk| {
                    let floats: &[f32] = bytemuck::cast_slice(chunk);
                    let mut acc = [0.0f32; 16];
                    for lanes in floats.chunks_exact(16) {
                        for l in 0..16 {
                            acc[l] += lanes[l];
                        }
                    }
                    acc.iter().sum::<f32>()
                })
                .sum()
        });
        let time = start.elapsed().as_secs_f64();
        black_box(sum);
        time
    }

    fn bytes(&self) -> usize {
        self.bytes
    }

    fn copies(&self) -> usize {
        self.caches.len()
    }
}

/// Per case: seconds of one decode step and of the streaming read of the same bytes
/// (medians). Every step runs each case's decode and read in turn, so that a shared machine's
/// drift hits all of them alike; the first step warms the workers up and is not counted.
fn decode_round(cases: &[&dyn DecodeCase], runs: usize) -> Vec<(f64, f64)> {
    let steps = cases
        .iter()
        .map(|case| case.copies())
        .max()
        .unwrap_or(1)
        .max(runs)
        .max(3);
    let mut times = vec![(Vec::new(), Vec::new()); cases.len()];
    for step in 0..steps + 1 {
        for (case, (decode, stream)) in cases.iter().zip(&mut times) {
            let (d, s) = (case.decode(step), case.stream(step));
            if step > 0 {
                decode.push(d);
                stream.push(s);
            }
        }
    }
    times
        .into_iter()
        .map(|(decode, stream)| (median(decode), median(stream)))
        .collect()
}

fn main() {
    let runs = env_usize("GQA_BENCH_RUNS", 3);
    let batches = env_list("GQA_CPU_BATCHES", &[1, 4]);
    let lengths = env_list("GQA_CPU_LENGTHS", &[512, 1024, 2048, 4096]);
    let decode_lengths = env_list("GQA_CPU_DECODE_LENGTHS", &[1024, 4096, 16384]);
    let decode_batches = env_list("GQA_CPU_DECODE_BATCHES", &[1, 8]);
    let threads = env_list("GQA_CPU_THREADS", &[1, 2]);
    let only = std::env::var("GQA_CPU_ONLY").unwrap_or_default();
    println!(
        "CPU backend, {HQ} query heads, D {D}, f32; last-level cache {} MiB; median of {runs}",
        last_level_cache() >> 20
    );
    if only != "decode" {
        println!(
            "\nprefill, causal: GFLOP/s = 2·B·HQ·L²·D / time; GEMM = [L, D]·[D, L] per head: same FLOPs, same threads"
        );
        println!(
            "{:>3} {:>2} {:>5} {:<9} {:>10} {:>9} {:>10} {:>9}",
            "thr", "B", "L", "heads", "ms", "GFLOP/s", "GEMM GF/s", "vs GEMM"
        );
        for &t in &threads {
            let cpu = Cpu::with_threads(t).unwrap();
            for &batch in &batches {
                for &len in &lengths {
                    for (label, spec) in [
                        ("GQA 32/8", *Attention::<HQ, 8, D>::new().causal().spec()),
                        ("MHA 32/32", *Attention::<HQ, 32, D>::new().causal().spec()),
                        ("MQA 32/1", *Attention::<HQ, 1, D>::new().causal().spec()),
                    ] {
                        let (time, gemm_time) = prefill(&cpu, &spec, batch, len, runs);
                        let flops = 2.0 * (batch * HQ * len * len * D) as f64;
                        let (ours, ceiling) = (flops / time / 1e9, flops / gemm_time / 1e9);
                        println!(
                            "{t:>3} {batch:>2} {len:>5} {label:<9} {:>10.1} {ours:>9.1} {ceiling:>10.1} {:>9.2}",
                            time * 1e3,
                            ours / ceiling
                        );
                    }
                }
            }
        }
    }
    if only != "prefill" {
        println!(
            "\ndecode, 1 query, f32 cache, cold: GB/s of K/V read; stream = a sum over the same bytes, same threads"
        );
        println!(
            "{:>3} {:>2} {:>6} {:<9} {:>9} {:>8} {:>10} {:>9} {:>14}",
            "thr", "B", "Lk", "heads", "ms", "GB/s", "stream GB/s", "vs stream", "vs MHA (ideal)"
        );
        for &t in &threads {
            let cpu = Cpu::with_threads(t).unwrap();
            for &batch in &decode_batches {
                for &len in &decode_lengths {
                    let (mha, gqa, mqa) = (
                        Decode::<32>::new(&cpu, batch, len),
                        Decode::<8>::new(&cpu, batch, len),
                        Decode::<1>::new(&cpu, batch, len),
                    );
                    let cases: [&dyn DecodeCase; 3] = [&mha, &gqa, &mqa];
                    let times = decode_round(&cases, runs);
                    let rows = [("MHA 32/32", 1), ("GQA 32/8", 4), ("MQA 32/1", 32)]
                        .into_iter()
                        .zip(times.into_iter().zip(cases))
                        .map(|((label, ideal), ((time, read), case))| {
                            (label, (time, read, case.bytes()), ideal)
                        })
                        .collect::<Vec<_>>();
                    let mha = rows[0].1.0;
                    for (label, (time, read, bytes), ideal) in rows {
                        let gbs = bytes as f64 / time / 1e9;
                        let stream = bytes as f64 / read / 1e9;
                        println!(
                            "{t:>3} {batch:>2} {len:>6} {label:<9} {:>9.3} {gbs:>8.2} {stream:>10.2} {:>9.2} {:>8.2}x ({ideal}x)",
                            time * 1e3,
                            gbs / stream,
                            mha / time
                        );
                    }
                }
            }
        }
    }
}
