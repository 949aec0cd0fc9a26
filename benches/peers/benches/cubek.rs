//! gqa's kernel side by side with cubek-attention 0.3.1 on the same cubecl device, f32.
//!
//! cubek-attention has no GQA: query, key and value must have the same number of heads. So a
//! 32/8 GQA layer is run three ways: (a) our kernel on the 8 KV heads; (b) cubek on K/V already
//! repeated to 32 heads (the repeat is not timed: the cost of a model that stores K/V repeated,
//! 4x the KV cache); (c) cubek plus the device-side repeat of K/V from 8 to 32 heads, timed (the
//! cost of a model that stores 8 KV heads and expands them per call). MHA 32/32 is the reference.
//!
//! Before timing, each output is downloaded and compared with ours (max abs difference). Both
//! use the scale 1/sqrt(D), the layout [B, H, L, D] (cubek reads the strides it is given) and a
//! bottom-right causal mask (the same as top-left here: Lq = Lk).
//!
//! Each timed run is launch(es) then a full device sync; the first launch of each kernel (JIT,
//! seconds on lavapipe) is a warm-up outside the timing; the median of `GQA_PEER_RUNS` runs
//! (default 5) is reported. `GQA_PEER_SEQS` lists the lengths L (default 256,512,1024; without a
//! mask only up to `GQA_PEER_UNMASKED_MAX`, default 512). The table ends with the targets:
//! our time at most 0.5x cubek's with the causal mask, 1.0x without.
//!
//! Run: `cargo bench --manifest-path benches/peers/Cargo.toml`.

use std::time::Instant;

use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::zspace::{Shape, Strides};
use cubek_attention::forward::definition::{AttentionGlobalTypes, AttentionOptions};
use cubek_attention::forward::launch::{BlueprintStrategy, Strategy, launch_ref};
use gqa::cube::{CubeDevice, DeviceTensor};
use gqa::{AttentionSpec, Gqa, Mha};
use ndarray::{Array4, ArrayView4};

const BATCH: usize = 1;
const Q_HEADS: usize = 32;
const KV_HEADS: usize = 8;
const GROUP: usize = Q_HEADS / KV_HEADS;
const HEAD_DIM: usize = 128;

/// Copies K or V `[B, kv_heads, L, D]` to `[B, q_heads, L, D]`: output head `h` reads KV head
/// `h / group` (the GQA sharing rule). One unit per output element.
#[cube(launch)]
fn repeat_kv_heads<F: Float>(
    src: &[F],
    dst: &mut [F],
    head_len: u32,
    q_heads: u32,
    kv_heads: u32,
    #[comptime] group: u32,
) {
    let i = ABSOLUTE_POS;
    if i < dst.len() {
        let head_len = head_len as usize;
        let head = i / head_len; // b * q_heads + h
        let b = head / q_heads as usize;
        let h = head % q_heads as usize;
        let src_head = b * kv_heads as usize + h / group as usize;
        dst[i] = src[src_head * head_len + i % head_len];
    }
}

/// Deterministic values in [-1, 1) from a 64-bit LCG.
fn lcg_array(shape: (usize, usize, usize, usize), seed: u64) -> Array4<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    Array4::from_shape_simple_fn(shape, || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    })
}

/// A host array repeated along the head axis: head `h` is head `h / group` of `x`.
fn repeat_heads_host(x: ArrayView4<f32>, group: usize) -> Array4<f32> {
    let (b, h, l, d) = x.dim();
    Array4::from_shape_fn((b, h * group, l, d), |(bi, hi, li, di)| {
        x[[bi, hi / group, li, di]]
    })
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

fn median_ms(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) })
}

/// A contiguous `[B, H, L, D]` f32 tensor on the cubecl client, for cubek.
struct CubeTensor {
    handle: Handle,
    shape: [usize; 4],
}

impl CubeTensor {
    fn upload(client: &Client, x: ArrayView4<f32>) -> Self {
        let data: Vec<f32> = x.iter().copied().collect();
        let (b, h, l, d) = x.dim();
        CubeTensor {
            handle: client.create_from_slice(f32::as_bytes(&data)),
            shape: [b, h, l, d],
        }
    }

    fn empty(client: &Client, shape: [usize; 4]) -> Self {
        let len: usize = shape.iter().product();
        CubeTensor {
            handle: client.empty(len * size_of::<f32>()),
            shape,
        }
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    fn binding(&self) -> TensorBinding {
        let [_, h, l, d] = self.shape;
        let strides = Strides::new(&[h * l * d, l * d, d, 1]);
        // SAFETY: contiguous strides of `shape`, and the buffer holds `shape`'s elements.
        unsafe {
            TensorBinding::from_raw_parts(self.handle.clone(), strides, Shape::new(self.shape))
        }
    }

    fn download(&self, client: &Client) -> Result<Vec<f32>, String> {
        let bytes = client
            .read_one(self.handle.clone())
            .map_err(|e| format!("{e:?}"))?;
        Ok(f32::from_bytes(&bytes)[..self.len()].to_vec())
    }
}

fn sync(client: &Client) -> Result<(), String> {
    cubecl::future::block_on(client.sync()).map_err(|e| format!("{e:?}"))
}

/// cubek-attention's forward, Unit routine, blueprint inferred from the device.
fn cubek_launch(
    client: &Client,
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    out: &CubeTensor,
    causal: bool,
) -> Result<(), String> {
    let dtypes = AttentionGlobalTypes::from_single_float_dtype(
        f32::elem_type_native(),
        AttentionGlobalTypes::mask_dtype(client),
    );
    let options = AttentionOptions {
        causal,
        ..Default::default()
    };
    launch_ref(
        Strategy::Unit(BlueprintStrategy::Inferred(())),
        client,
        q.binding(),
        k.binding(),
        v.binding(),
        None,
        out.binding(),
        &dtypes,
        options,
    )
    .map_err(|e| format!("{e}"))
}

/// Repeats `src` (`[B, KV_HEADS, L, D]`) into `dst` (`[B, Q_HEADS, L, D]`) on the device.
fn repeat_launch(client: &Client, src: &CubeTensor, dst: &CubeTensor) {
    let [_, kv_heads, l, d] = src.shape;
    let [_, q_heads, ..] = dst.shape;
    let units = CubeDim::new_1d(256);
    let cubes = cubecl::calculate_cube_count_elemwise(client, dst.len(), units);
    unsafe {
        repeat_kv_heads::launch::<f32>(
            client,
            cubes,
            units,
            BufferArg::from_raw_parts(src.handle.clone(), src.len()),
            BufferArg::from_raw_parts(dst.handle.clone(), dst.len()),
            (l * d) as u32,
            q_heads as u32,
            kv_heads as u32,
            (q_heads / kv_heads) as u32,
        );
    }
}

/// Warm-up run (JIT) then `runs` timed runs of `f` followed by `sync`; the median in ms, or the
/// first error.
fn time_runs(
    runs: usize,
    mut f: impl FnMut() -> Result<(), String>,
    sync: impl Fn() -> Result<(), String>,
) -> Result<f64, String> {
    f()?;
    sync()?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        sync()?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median_ms(samples))
}

struct Row {
    shape: String,
    mask: &'static str,
    ours: Result<f64, String>,
    cubek: Result<f64, String>,
    cubek_repeat: Option<Result<f64, String>>,
}

fn ms(x: &Result<f64, String>) -> String {
    match x {
        Ok(v) => format!("{v:.1}"),
        Err(_) => "error".into(),
    }
}

fn ratio(a: &Result<f64, String>, b: &Result<f64, String>) -> String {
    match (a, b) {
        (Ok(a), Ok(b)) => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

struct Inputs {
    q: DeviceTensor<f32>,
    k: DeviceTensor<f32>,
    v: DeviceTensor<f32>,
    cq: CubeTensor,
    /// K/V as our kernel sees them (8 heads for GQA, 32 for MHA).
    ck: CubeTensor,
    cv: CubeTensor,
    /// K/V repeated to 32 heads on the host (GQA only; MHA: same as `ck`/`cv`).
    ck_rep: Option<CubeTensor>,
    cv_rep: Option<CubeTensor>,
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    device: &CubeDevice,
    client: &Client,
    spec: &AttentionSpec,
    inputs: &Inputs,
    shape: String,
    causal: bool,
    runs: usize,
) -> Row {
    let mask = if causal { "causal" } else { "none" };
    let seq = inputs.cq.shape[2];
    let out_shape = [BATCH, Q_HEADS, seq, HEAD_DIM];
    let gqa = inputs.ck_rep.is_some();
    println!("-- {shape} {mask}");

    // Ours, into outputs allocated here, once (`try_forward_into`; launch constants are
    // uploaded on the first call and reused).
    let ours_out_buffers = std::cell::RefCell::new(
        device
            .try_forward_output::<f32>(spec, BATCH, seq)
            .expect("outputs"),
    );
    let ours_forward = || {
        device
            .try_forward_into(
                spec,
                &inputs.q,
                &inputs.k,
                &inputs.v,
                &mut ours_out_buffers.borrow_mut(),
            )
            .map_err(|e| e.to_string())
    };
    let ours_out = ours_forward().and_then(|()| {
        device
            .try_download(&ours_out_buffers.borrow().o)
            .map(|o| o.iter().copied().collect::<Vec<f32>>())
            .map_err(|e| e.to_string())
    });
    if let Err(e) = &ours_out {
        println!("   ours: error: {e}");
    }
    // The first launch tuned the tile for this problem's key.
    match device.tuned_forward_tile::<f32>(spec, BATCH, seq, seq) {
        Some(tile) => println!("   ours: autotuned tile {tile}"),
        None => println!("   ours: no tuned tile"),
    }

    // cubek on K/V with as many heads as Q (pre-repeated for GQA). Output allocated here, once.
    let (k_full, v_full) = match (&inputs.ck_rep, &inputs.cv_rep) {
        (Some(k), Some(v)) => (k, v),
        _ => (&inputs.ck, &inputs.cv),
    };
    let cubek_out = CubeTensor::empty(client, out_shape);
    let cubek_check = cubek_launch(client, &inputs.cq, k_full, v_full, &cubek_out, causal)
        .and_then(|()| sync(client))
        .and_then(|()| cubek_out.download(client));
    match (&ours_out, &cubek_check) {
        (Ok(a), Ok(b)) => println!("   max |ours - cubek| = {:.3e}", max_abs_diff(a, b)),
        (_, Err(e)) => println!("   cubek: unsupported/error: {e}"),
        _ => {}
    }

    // cubek after repeating K/V from 8 to 32 heads on the device. Buffers allocated here, once.
    let repeat_bufs = gqa.then(|| {
        (
            CubeTensor::empty(client, out_shape),
            CubeTensor::empty(client, out_shape),
            CubeTensor::empty(client, out_shape),
        )
    });
    let repeat_and_cubek = |(k_rep, v_rep, out): &(CubeTensor, CubeTensor, CubeTensor)| {
        repeat_launch(client, &inputs.ck, k_rep);
        repeat_launch(client, &inputs.cv, v_rep);
        cubek_launch(client, &inputs.cq, k_rep, v_rep, out, causal)
    };
    if let Some(bufs) = &repeat_bufs {
        let check = repeat_and_cubek(bufs)
            .and_then(|()| sync(client))
            .and_then(|()| bufs.2.download(client));
        match (&ours_out, &check) {
            (Ok(a), Ok(b)) => println!(
                "   max |ours - (repeat + cubek)| = {:.3e}",
                max_abs_diff(a, b)
            ),
            (_, Err(e)) => println!("   repeat + cubek: error: {e}"),
            _ => {}
        }
    }

    // Timing (each closure's first call is the warm-up; the kernels are compiled by now).
    let ours = ours_out.and_then(|_| {
        time_runs(
            runs,
            || ours_forward(),
            || device.try_sync().map_err(|e| e.to_string()),
        )
    });
    let cubek = cubek_check.and_then(|_| {
        time_runs(
            runs,
            || cubek_launch(client, &inputs.cq, k_full, v_full, &cubek_out, causal),
            || sync(client),
        )
    });
    let cubek_repeat = repeat_bufs
        .as_ref()
        .map(|bufs| time_runs(runs, || repeat_and_cubek(bufs), || sync(client)));
    for (name, r) in [("ours", &ours), ("cubek", &cubek)]
        .into_iter()
        .chain(cubek_repeat.as_ref().map(|r| ("cubek+repeat", r)))
    {
        match r {
            Ok(t) => println!("   {name}: {t:.1} ms"),
            Err(e) => println!("   {name}: error: {e}"),
        }
    }
    Row {
        shape,
        mask,
        ours,
        cubek,
        cubek_repeat,
    }
}

/// The targets: our time over cubek's (pre-repeated K/V), at most this.
fn target(causal: bool) -> f64 {
    if causal { 0.5 } else { 1.0 }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let seqs: Vec<usize> = std::env::var("GQA_PEER_SEQS")
        .unwrap_or_else(|_| "256,512,1024".into())
        .split(',')
        .map(|x| {
            x.trim()
                .parse()
                .unwrap_or_else(|_| panic!("GQA_PEER_SEQS: {x:?} is not a number"))
        })
        .collect();
    let runs = env_usize("GQA_PEER_RUNS", 5).max(1);
    // Without a mask only up to this length (the targets name L = 256 and 512).
    let unmasked_max = env_usize("GQA_PEER_UNMASKED_MAX", 512);

    let device = CubeDevice::try_default().expect("a cubecl device (lavapipe without a GPU)");
    // The same device gqa opens (wgpu's default adapter, WGSL; gqa built without `vulkan`):
    // cubecl keeps one client/server per device, so this is the client gqa launches on.
    let client = cubecl::Device::wgpu(cubecl::device::WgpuDeviceKind::DefaultDevice)
        .expect("wgpu device")
        .client();
    println!("device (gqa): {}", device.name());
    println!(
        "device (cubecl client for cubek): {}",
        client.properties().identity.name
    );
    println!(
        "f32, B = {BATCH}, D = {HEAD_DIM}, Lq = Lk in {seqs:?}, median of {runs} runs after 1 warm-up; \
         cubek-attention 0.3.1, Unit routine; our forward tile: autotuned (printed per shape)"
    );

    let gqa_layer = Gqa::<Q_HEADS, KV_HEADS, HEAD_DIM>::new();
    let mha_layer = Mha::<Q_HEADS, HEAD_DIM>::new();
    let mut rows = Vec::new();
    for &seq in &seqs {
        let q = lcg_array((BATCH, Q_HEADS, seq, HEAD_DIM), 1);
        let k = lcg_array((BATCH, KV_HEADS, seq, HEAD_DIM), 2);
        let v = lcg_array((BATCH, KV_HEADS, seq, HEAD_DIM), 3);
        let k_mha = lcg_array((BATCH, Q_HEADS, seq, HEAD_DIM), 4);
        let v_mha = lcg_array((BATCH, Q_HEADS, seq, HEAD_DIM), 5);

        // All uploads and the host-side repeat happen here, outside every timed region.
        let up = |x: &Array4<f32>| device.try_upload(x.view()).expect("upload");
        let gqa_inputs = Inputs {
            q: up(&q),
            k: up(&k),
            v: up(&v),
            cq: CubeTensor::upload(&client, q.view()),
            ck: CubeTensor::upload(&client, k.view()),
            cv: CubeTensor::upload(&client, v.view()),
            ck_rep: Some(CubeTensor::upload(
                &client,
                repeat_heads_host(k.view(), GROUP).view(),
            )),
            cv_rep: Some(CubeTensor::upload(
                &client,
                repeat_heads_host(v.view(), GROUP).view(),
            )),
        };
        let mha_inputs = Inputs {
            q: up(&q),
            k: up(&k_mha),
            v: up(&v_mha),
            cq: CubeTensor::upload(&client, q.view()),
            ck: CubeTensor::upload(&client, k_mha.view()),
            cv: CubeTensor::upload(&client, v_mha.view()),
            ck_rep: None,
            cv_rep: None,
        };
        let gqa_shape = format!("GQA {Q_HEADS}/{KV_HEADS}/{HEAD_DIM} L={seq}");
        let mha_shape = format!("MHA {Q_HEADS}/{Q_HEADS}/{HEAD_DIM} L={seq}");
        for causal in [true, false] {
            if !causal && seq > unmasked_max {
                continue;
            }
            let (g, m) = if causal {
                (gqa_layer.causal(), mha_layer.causal())
            } else {
                (gqa_layer, mha_layer)
            };
            rows.push(run_case(
                &device,
                &client,
                g.spec(),
                &gqa_inputs,
                gqa_shape.clone(),
                causal,
                runs,
            ));
            rows.push(run_case(
                &device,
                &client,
                m.spec(),
                &mha_inputs,
                mha_shape.clone(),
                causal,
                runs,
            ));
        }
    }

    println!();
    println!(
        "| {:<22} | {:<6} | {:>9} | {:>9} | {:>15} | {:>10} | {:>17} | {:>18} |",
        "shape",
        "mask",
        "ours ms",
        "cubek ms",
        "cubek+repeat ms",
        "ours/cubek",
        "ours/(cubek+rep)",
        "target ours/cubek"
    );
    println!(
        "|{:-<24}|{:-<8}|{:->11}|{:->11}|{:->17}|{:->12}|{:->19}|{:->20}|",
        "", "", "", "", "", "", "", ""
    );
    for row in &rows {
        let (rep_ms, rep_ratio) = match &row.cubek_repeat {
            Some(r) => (ms(r), ratio(&row.ours, r)),
            None => ("n/a".into(), "n/a".into()),
        };
        let causal = row.mask == "causal";
        let verdict = match (&row.ours, &row.cubek) {
            (Ok(a), Ok(b)) if a / b <= target(causal) => "met",
            (Ok(_), Ok(_)) => "missed",
            _ => "-",
        };
        println!(
            "| {:<22} | {:<6} | {:>9} | {:>9} | {:>15} | {:>10} | {:>17} | {:>11} {:>6} |",
            row.shape,
            row.mask,
            ms(&row.ours),
            ms(&row.cubek),
            rep_ms,
            ratio(&row.ours, &row.cubek),
            rep_ratio,
            format!("<= {:.1}", target(causal)),
            verdict,
        );
    }
}
