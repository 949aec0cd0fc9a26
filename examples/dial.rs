//! The dial: what each choice of KV heads costs and gives for a model, from its `config.json`.
//!
//! For every divisor `G` of the model's query heads, as its KV heads: the KV cache per token and
//! per sequence (all layers, the model's dtype), the sequences that fit a memory budget, the
//! measured time of one attention decode step per layer (batch 1, against `--context` cached
//! tokens, f32 cache) on the CPU backend and on the GPU backend (the best device; lavapipe
//! without a GPU), and, given an MHA checkpoint of one layer (`--checkpoint DIR`), the
//! relative output error of its mean-pooled conversion to `G` KV heads. The table is printed
//! and drawn as an SVG chart (`--chart PATH`, default `dial.svg`).
//!
//! ```text
//! cargo run --release --example dial -- tests/fixtures/configs/llama-3-8b.json \
//!     [--context 4096] [--memory-gib 80] [--steps 32] [--cpu-only] \
//!     [--checkpoint DIR [--prefix model.layers.0.self_attn.]] [--chart dial.svg]
//! ```
//!
//! The head splits are types (`Attention<HQ, HKV, D>`), so each model shape the dial measures
//! is listed below and compiled in (`gqa::dispatch!`): Llama-3-8B, Mistral-7B and Llama-2-7B
//! (32 × 128), Qwen2.5-7B (28 × 128), Gemma-2-9B (16 × 256), Phi-3-mini (32 × 96),
//! Falcon-7B (71 × 64), and the uptraining example's block (8 × 16). Other shapes get the
//! memory columns and a note.

use std::any::Any;
use std::cell::RefCell;
use std::time::Instant;

use gqa::cache::{Float32, KvCache, Layout, SeqId};
use gqa::cpu::Cpu;
use gqa::cube::{CubeDevice, DeviceKvCache, DeviceTensor};
use gqa::heads::{Rule, Supported};
use gqa::layer::train::relative_error;
use gqa::layer::{KvInit, MhaLayer, checkpoint};
use gqa::{Attention, DType, DynAttention, Error, ModelConfig};
use ndarray::{Array3, Array4};
use plotters::prelude::*;

/// The command line (public, as [`Row`] and [`Measured`], for `tests/dial.rs`).
pub struct Options {
    pub config: String,
    pub context: usize,
    pub memory_gib: u128,
    pub steps: usize,
    pub cpu_only: bool,
    pub checkpoint: Option<String>,
    pub prefix: String,
    pub chart: String,
    /// The GPU device's name, once it is open.
    pub gpu_name: Option<String>,
    /// The checkpoint's layer, read at the first `G` (a `Result<MhaLayer<HQ, D>, Error>`).
    pub loaded: RefCell<Option<Box<dyn Any>>>,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter().position(|a| a == flag).map(|i| {
            args.get(i + 1)
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .clone()
        })
    };
    let number = |flag: &str, default: usize| {
        value(flag).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{flag} takes a whole number, got {v:?}"))
        })
    };
    let config = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| {
            eprintln!("usage: dial <config.json> [--context N] [--memory-gib N] [--steps N] [--cpu-only] [--checkpoint DIR [--prefix P]] [--chart PATH]");
            std::process::exit(2)
        });
    Options {
        config,
        context: number("--context", 4096),
        memory_gib: number("--memory-gib", 80) as u128,
        steps: number("--steps", 32),
        cpu_only: args.iter().any(|a| a == "--cpu-only"),
        checkpoint: value("--checkpoint"),
        prefix: value("--prefix").unwrap_or_else(|| "model.layers.0.self_attn.".into()),
        chart: value("--chart").unwrap_or_else(|| "dial.svg".into()),
        gpu_name: None,
        loaded: RefCell::new(None),
    }
}

/// What one `G` measured: each part `None` where it was not asked for or failed (its error
/// then in `notes`, so that one part's failure costs no other).
#[derive(Default)]
pub struct Measured {
    pub cpu_seconds: Option<f64>,
    pub gpu_seconds: Option<f64>,
    /// The mean-pooled conversion's relative output error against the checkpoint's layer.
    pub error: Option<f64>,
    pub notes: Vec<String>,
}

impl Measured {
    /// `result`'s value, or `None` with a note naming `what` failed and why.
    fn keep<T>(&mut self, what: &str, result: Result<T, Error>) -> Option<T> {
        result
            .map_err(|e| self.notes.push(format!("{what}: {e}")))
            .ok()
    }
}

/// A pseudo-random `[shape]` array in `±1`.
fn noise(shape: [usize; 4], seed: u64) -> Array4<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    Array4::from_shape_simple_fn(shape, || rng.f32() * 2.0 - 1.0)
}

/// One `G`'s decode, prepared: its cache filled (and copied to the device), so that the timed
/// steps of every `G` can run in turn.
trait Decoder {
    fn cpu_step(&mut self) -> Result<(), Error>;
    /// `None` without a device (or where its copy of the cache could not be made).
    fn gpu_step(&mut self) -> Option<Result<(), Error>>;
}

struct Prepared<'a, const HQ: usize, const HKV: usize, const D: usize>
where
    Rule: Supported<HQ, HKV, D> + Supported<HKV, HKV, D>,
{
    attention: Attention<HQ, HKV, D>,
    cache: KvCache<HKV, D, Float32>,
    seq: SeqId,
    q: Array4<f32>,
    cpu: Cpu,
    gpu: Option<(
        &'a CubeDevice,
        DeviceKvCache<HKV, D, Float32>,
        DeviceTensor<f32>,
    )>,
}

impl<const HQ: usize, const HKV: usize, const D: usize> Decoder for Prepared<'_, HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D> + Supported<HKV, HKV, D>,
{
    fn cpu_step(&mut self) -> Result<(), Error> {
        let out =
            self.attention
                .try_decode_cpu(&self.cpu, self.q.view(), &self.cache, &[self.seq])?;
        std::hint::black_box(out);
        Ok(())
    }

    fn gpu_step(&mut self) -> Option<Result<(), Error>> {
        let (device, copy, q) = self.gpu.as_mut()?;
        Some((|| {
            let out = self
                .attention
                .try_decode(device, q, &self.cache, copy, &[self.seq])?;
            device.try_sync()?;
            drop(out);
            Ok(())
        })())
    }
}

/// Prepares `Attention<HQ, HKV, D>`'s decode (one query token, batch 1, against a cache of
/// `context` tokens) on the CPU and on `device`, and, given a checkpoint, measures the
/// conversion's output error. What fails is a note in `measured`.
fn prepare<'a, const HQ: usize, const HKV: usize, const D: usize>(
    options: &Options,
    device: Option<&'a CubeDevice>,
    measured: &mut Measured,
) -> Option<Box<dyn Decoder + 'a>>
where
    Rule: Supported<HQ, HKV, D> + Supported<HKV, HKV, D> + Supported<HQ, HQ, D>,
{
    let attention = Attention::<HQ, HKV, D>::new().causal();
    if let Some(dir) = &options.checkpoint {
        // Read once for every `G` (the layer's type is the same for all of them).
        let mut loaded = options.loaded.borrow_mut();
        let mha = loaded
            .get_or_insert_with(|| {
                Box::new(
                    checkpoint::try_read_layer::<HQ, HQ, D>(dir.as_ref(), &options.prefix)
                        .map(|read| read.layer),
                )
            })
            .downcast_ref::<Result<MhaLayer<HQ, D>, Error>>()
            .expect("one model's layer per run")
            .clone();
        let error = mha.and_then(|mha| {
            let gqa = mha.to_gqa::<HKV>(KvInit::MeanPool);
            let mut rng = fastrand::Rng::with_seed(4);
            let x = Array3::from_shape_simple_fn((1, 64, mha.hidden()), || rng.f32() * 2.0 - 1.0);
            let cpu = Cpu::new();
            let y_mha = mha
                .try_forward(&Attention::<HQ, HQ, D>::new().causal(), &cpu, x.view())?
                .y;
            let y_gqa = gqa.try_forward(&attention, &cpu, x.view())?.y;
            Ok(relative_error(y_gqa.view(), y_mha.view()))
        });
        measured.error = measured.keep("conversion error", error);
    }
    let cache = (|| {
        let mut cache = attention.try_new_cache::<Float32>(Layout::Contiguous {
            sequences: 1,
            capacity: options.context,
        })?;
        let seq = cache.try_add_sequence()?;
        let kv = |seed| noise([1, HKV, options.context, D], seed);
        let (k, v) = (kv(1), kv(2));
        cache.try_append(
            seq,
            k.index_axis(ndarray::Axis(0), 0),
            v.index_axis(ndarray::Axis(0), 0),
        )?;
        Ok((cache, seq))
    })();
    let (cache, seq) = measured.keep("KV cache", cache)?;
    let q = noise([1, HQ, 1, D], 3);
    let gpu = device.and_then(|device| {
        let copy = (|| {
            Ok((
                device.try_upload_cache(&cache)?,
                device.try_upload(q.view())?,
            ))
        })();
        measured
            .keep("GPU decode", copy)
            .map(|(copy, q)| (device, copy, q))
    });
    Some(Box::new(Prepared {
        attention,
        cache,
        seq,
        q,
        cpu: Cpu::new(),
        gpu,
    }))
}

/// The median CPU and GPU decode step of each prepared row, in seconds: one untimed step of
/// each (the GPU's compiles its kernel), then `steps` rounds of one step of every row in turn,
/// so that the machine's drifts fall on all rows alike. A row whose step fails is a note.
fn time_in_turn(rows: &mut [Row], decoders: &mut [Option<Box<dyn Decoder + '_>>], steps: usize) {
    let mut times = vec![(Vec::new(), Vec::new()); rows.len()];
    let mut failed = vec![(false, false); rows.len()];
    for round in 0..=steps.max(1) {
        for (i, decoder) in decoders.iter_mut().enumerate() {
            let (Some(decoder), Some(measured)) = (decoder, rows[i].measured.as_mut()) else {
                continue;
            };
            if !failed[i].0 {
                let start = Instant::now();
                let result = decoder.cpu_step();
                let seconds = start.elapsed().as_secs_f64();
                match result {
                    Ok(()) if round > 0 => times[i].0.push(seconds),
                    Ok(()) => {}
                    Err(e) => {
                        failed[i].0 = true;
                        measured.notes.push(format!("CPU decode: {e}"));
                    }
                }
            }
            if !failed[i].1 {
                let start = Instant::now();
                let result = decoder.gpu_step();
                let seconds = start.elapsed().as_secs_f64();
                match result {
                    None => {}
                    Some(Ok(())) if round > 0 => times[i].1.push(seconds),
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        failed[i].1 = true;
                        measured.notes.push(format!("GPU decode: {e}"));
                    }
                }
            }
        }
    }
    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times.get(times.len() / 2).copied()
    };
    for ((row, (cpu, gpu)), failed) in rows.iter_mut().zip(&mut times).zip(failed) {
        if let Some(measured) = row.measured.as_mut() {
            measured.cpu_seconds = median(cpu).filter(|_| !failed.0);
            measured.gpu_seconds = median(gpu).filter(|_| !failed.1);
        }
    }
}

/// [`prepare`] for the shapes compiled in: `None` for any other.
fn prepare_any<'a>(
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
    options: &Options,
    device: Option<&'a CubeDevice>,
    measured: &mut Measured,
) -> Option<Option<Box<dyn Decoder + 'a>>> {
    gqa::dispatch!(
        (q_heads, kv_heads, head_dim),
        [
            (32, 1, 128),
            (32, 2, 128),
            (32, 4, 128),
            (32, 8, 128),
            (32, 16, 128),
            (32, 32, 128),
            (28, 1, 128),
            (28, 2, 128),
            (28, 4, 128),
            (28, 7, 128),
            (28, 14, 128),
            (28, 28, 128),
            (16, 1, 256),
            (16, 2, 256),
            (16, 4, 256),
            (16, 8, 256),
            (16, 16, 256),
            (32, 1, 96),
            (32, 2, 96),
            (32, 4, 96),
            (32, 8, 96),
            (32, 16, 96),
            (32, 32, 96),
            (71, 1, 64),
            (71, 71, 64),
            (8, 1, 16),
            (8, 2, 16),
            (8, 4, 16),
            (8, 8, 16),
        ],
        |HQ, HKV, D| prepare::<HQ, HKV, D>(options, device, measured)
    )
    .ok()
}

/// One `G`: its KV cache (bytes per token and per sequence, all layers, the model's dtype),
/// the sequences that fit the budget, and what was measured (`None`: a shape not compiled in).
pub struct Row {
    pub kv_heads: usize,
    pub per_token: u128,
    pub per_sequence: u128,
    pub sequences: u128,
    pub measured: Option<Measured>,
}

fn mib(bytes: u128) -> f64 {
    bytes as f64 / (1u128 << 20) as f64
}

fn main() -> Result<(), Error> {
    run(&mut options()).map(|_| ())
}

/// The dial: measures, prints and draws every `G`, and returns the rows.
pub fn run(options: &mut Options) -> Result<Vec<Row>, Error> {
    let config = ModelConfig::from_json_file(&options.config)?;
    let (heads, head_dim) = (config.num_attention_heads, config.head_dim);
    let layers = config.num_hidden_layers.unwrap_or(1);
    let dtype = config.dtype.unwrap_or(DType::BF16);
    let assumed = [
        config.num_hidden_layers.is_none().then_some("1 layer"),
        config.dtype.is_none().then_some("bf16"),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>();
    if !assumed.is_empty() {
        println!("the config does not say: {} assumed", assumed.join(" and "));
    }
    let budget = options.memory_gib << 30;
    let device = if options.cpu_only {
        println!("--cpu-only: no GPU column");
        None
    } else {
        match CubeDevice::try_default() {
            Ok(device) => Some(device),
            Err(error) => {
                println!("no GPU device ({error}): CPU only");
                None
            }
        }
    };
    options.gpu_name = device.as_ref().map(|d| d.name().to_string());
    println!(
        "{}: {heads} query heads (this model: {} KV heads), head dim {head_dim}, {layers} layer{}, {dtype}",
        options.config,
        config.num_key_value_heads,
        if layers == 1 { "" } else { "s" }
    );
    println!(
        "decode: one query token, batch 1, one layer's attention against {} cached tokens (f32 cache), median of {} steps, the rows in turn; CPU: {} threads{}",
        options.context,
        options.steps,
        Cpu::new().threads(),
        device
            .as_ref()
            .map_or(String::new(), |d| format!("; GPU: {}", d.name()))
    );
    let (mut rows, mut decoders) = (Vec::new(), Vec::new());
    for kv_heads in (1..=heads).filter(|g| heads % g == 0) {
        let attention = DynAttention::try_new(heads, kv_heads, head_dim)?;
        let cache = attention.kv_cache(dtype);
        let per_sequence = cache.bytes(layers, 1, options.context);
        let mut measured = Measured::default();
        let decoder = prepare_any(
            (heads, kv_heads, head_dim),
            options,
            device.as_ref(),
            &mut measured,
        );
        let measured = decoder.is_some().then_some(measured);
        decoders.push(decoder.flatten());
        rows.push(Row {
            kv_heads,
            per_token: cache.bytes_per_token(layers),
            per_sequence,
            sequences: budget.checked_div(per_sequence).unwrap_or(0),
            measured,
        });
    }
    time_in_turn(&mut rows, &mut decoders, options.steps);
    drop(decoders);
    println!(
        "\n| KV heads | group | KV per token | KV per sequence ({} tokens) | sequences in {} GiB | CPU decode (µs) | GPU decode (µs) | conversion error |",
        options.context, options.memory_gib
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let show = |x: Option<f64>, scale: f64, digits: usize| {
        x.map_or("-".to_string(), |x| format!("{:.*}", digits, x * scale))
    };
    for row in &rows {
        let m = row.measured.as_ref();
        println!(
            "| {}{} | {} | {:.1} KiB | {:.1} MiB | {} | {} | {} | {} |",
            row.kv_heads,
            if row.kv_heads == config.num_key_value_heads {
                " (this model)"
            } else {
                ""
            },
            heads / row.kv_heads,
            row.per_token as f64 / 1024.0,
            mib(row.per_sequence),
            row.sequences,
            show(m.and_then(|m| m.cpu_seconds), 1e6, 1),
            show(m.and_then(|m| m.gpu_seconds), 1e6, 1),
            show(m.and_then(|m| m.error), 1.0, 4),
        );
    }
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|row| {
            let kv_heads = row.kv_heads;
            row.measured
                .iter()
                .flat_map(|m| &m.notes)
                .map(move |note| format!("{kv_heads} KV heads, {note}"))
        })
        .collect();
    if !notes.is_empty() {
        println!("\nnot measured (shown as -):");
        for note in &notes {
            println!("  {note}");
        }
    }
    if rows.iter().any(|r| r.measured.is_none()) {
        println!(
            "\n({heads} x {head_dim} is not among the shapes this dial compiles in: add its (HQ, G, D) triples to `prepare_any`)"
        );
    }
    draw(options, &config, &rows).map_err(|e| Error::Checkpoint {
        file: options.chart.clone(),
        reason: format!("cannot draw the chart: {e}"),
    })?;
    println!("\nchart: {}", options.chart);
    Ok(rows)
}

/// Two panels against KV heads: above, KV MiB per sequence (left axis) and decode µs (right
/// axis); below, the sequences that fit the memory budget (left) and, given a checkpoint, the
/// conversion's output error (right).
fn draw(
    options: &Options,
    config: &ModelConfig,
    rows: &[Row],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(&options.chart, (900, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(520);
    draw_costs(options, config, rows, &upper)?;
    draw_budget(options, rows, &lower)?;
    root.present()?;
    Ok(())
}

/// The model's name for the chart: the file's name, or its folder's for a `config.json`.
fn model_name(config: &str) -> String {
    let path = std::path::Path::new(config);
    let named = if path.file_name().is_some_and(|f| f == "config.json") {
        path.canonicalize()
            .ok()
            .and_then(|p| p.parent()?.file_name().map(|f| f.to_owned()))
    } else {
        path.file_name().map(|f| f.to_owned())
    };
    named.map_or("model".into(), |f| f.to_string_lossy().into_owned())
}

/// A panel's chart builder: its caption, margins and label areas (two y axes).
fn framed<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: String,
    size: u32,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", size))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70);
    builder
}

/// The x axis's label at `x`: the KV heads of the row there.
fn kv_label(rows: &[Row], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < rows.len() {
        rows[i as usize].kv_heads.to_string()
    } else {
        String::new()
    }
}

/// The lower panel: sequences in the budget as bars, the conversion error as a line.
fn draw_budget(
    options: &Options,
    rows: &[Row],
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> Result<(), Box<dyn std::error::Error>> {
    let n = rows.len();
    let max_sequences = rows.iter().map(|r| r.sequences).max().unwrap_or(0).max(1) as f64 * 1.1;
    let errors: Vec<(f64, f64)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i as f64, r.measured.as_ref()?.error?)))
        .collect();
    let max_error = errors.iter().map(|e| e.1).fold(0.0, f64::max).max(1e-3) * 1.1;
    let mut chart = framed(
        area,
        if errors.is_empty() {
            format!("what {} GiB of KV cache holds", options.memory_gib)
        } else {
            format!(
                "what {} GiB of KV cache holds, and what the conversion costs",
                options.memory_gib
            )
        },
        18,
    )
    .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..max_sequences)?
    .set_secondary_coord(-0.5f64..n as f64 - 0.5, 0f64..max_error);
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| kv_label(rows, *x))
        .x_desc("KV heads")
        .y_desc(format!("sequences of {} tokens", options.context))
        .draw()?;
    if !errors.is_empty() {
        chart
            .configure_secondary_axes()
            .y_desc("output error, mean-pooled (relative)")
            .draw()?;
    }
    let bars = rows.iter().enumerate().map(|(i, r)| {
        Rectangle::new(
            [(i as f64 - 0.3, 0.0), (i as f64 + 0.3, r.sequences as f64)],
            MAGENTA.mix(0.3).filled(),
        )
    });
    chart
        .draw_series(bars)?
        .label(format!("sequences in {} GiB", options.memory_gib))
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], MAGENTA.mix(0.3).filled()));
    if !errors.is_empty() {
        chart
            .draw_secondary_series(LineSeries::new(errors.clone(), BLACK.stroke_width(2)))?
            .label("conversion error (checkpoint)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(2)));
        chart.draw_secondary_series(
            errors
                .into_iter()
                .map(|p| Circle::new(p, 4, BLACK.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The upper panel: KV MiB per sequence as bars, CPU and GPU decode time as lines.
fn draw_costs(
    options: &Options,
    config: &ModelConfig,
    rows: &[Row],
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> Result<(), Box<dyn std::error::Error>> {
    let n = rows.len();
    let max_mib = rows.iter().map(|r| mib(r.per_sequence)).fold(0.0, f64::max) * 1.1;
    let times: Vec<(usize, Option<f64>, Option<f64>)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let m = r.measured.as_ref();
            (
                i,
                m.and_then(|m| m.cpu_seconds).map(|s| s * 1e6),
                m.and_then(|m| m.gpu_seconds).map(|s| s * 1e6),
            )
        })
        .collect();
    let max_us = times
        .iter()
        .flat_map(|(_, c, g)| [*c, *g])
        .flatten()
        .fold(1.0, f64::max)
        * 1.1;
    // lavapipe is Vulkan on the CPU: the label says which device the "GPU" line is.
    let gpu_label = format!(
        "GPU decode (µs){}",
        options
            .gpu_name
            .as_deref()
            .map_or(String::new(), |name| format!(
                ", {}",
                name.split(" (").next().unwrap_or(name)
            ))
    );
    let mut chart = framed(
        root,
        format!(
            "{}: {} query heads, head dim {}, {} tokens",
            model_name(&options.config),
            config.num_attention_heads,
            config.head_dim,
            options.context
        ),
        20,
    )
    .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..max_mib)?
    .set_secondary_coord(-0.5f64..n as f64 - 0.5, 0f64..max_us);
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| kv_label(rows, *x))
        .x_desc("KV heads")
        .y_desc("KV cache per sequence (MiB)")
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("decode step (µs)")
        .draw()?;
    let bars = rows.iter().enumerate().map(|(i, r)| {
        Rectangle::new(
            [(i as f64 - 0.3, 0.0), (i as f64 + 0.3, mib(r.per_sequence))],
            BLUE.mix(0.35).filled(),
        )
    });
    chart
        .draw_series(bars)?
        .label("KV cache per sequence (MiB)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLUE.mix(0.35).filled()));
    for (name, color, pick) in [
        ("CPU decode (µs)", RED, 0usize),
        (&*gpu_label, GREEN, 1usize),
    ] {
        let points: Vec<(f64, f64)> = times
            .iter()
            .filter_map(|(i, c, g)| [*c, *g][pick].map(|t| (*i as f64, t)))
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_secondary_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], color.stroke_width(2)));
        chart.draw_secondary_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
