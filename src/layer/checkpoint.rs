//! Hugging Face–layout attention layers in `safetensors` files, with their `config.json`.
//!
//! A model directory holds `config.json` and either `model.safetensors` or shards listed by
//! `model.safetensors.index.json` (its `weight_map`). A layer's tensors are named
//! `{prefix}q_proj.weight`, `{prefix}k_proj.weight`, `{prefix}v_proj.weight`,
//! `{prefix}o_proj.weight` and, where the model has them, the same with `.bias` (Llama writes
//! the prefix `model.layers.{i}.self_attn.`). Weights are read as `f32` from `F32`, `F16` or
//! `BF16` storage (exactly: every such value is an `f32`) and written back in a storage type
//! the caller names; writing the storage type a layer was read from is bit-exact.
//!
//! Each safetensors file a read touches is read into memory whole, once.
//!
//! [`try_convert_checkpoint`] converts a whole multi-head model directory into grouped-query
//! attention, one shard at a time, copying everything but the attention layers' key and value
//! projections bit for bit.
//!
//! ```
//! use gqa::layer::{KvInit, MhaLayer, checkpoint};
//! use gqa::DType;
//! let dir = std::env::temp_dir().join(format!("gqa-doc-{}", std::process::id()));
//! let config = serde_json::json!({
//!     "num_attention_heads": 8, "num_key_value_heads": 8, "hidden_size": 64, "torch_dtype": "bfloat16"
//! });
//! let mha = MhaLayer::<8, 8>::random(64, 1);
//! checkpoint::try_write_layer(&dir.join("mha"), "self_attn.", &mha, DType::BF16, &config)?;
//! // Read it back, convert to GQA-2 and write a checkpoint whose config says 2 KV heads.
//! let read = checkpoint::try_read_layer::<8, 8, 8>(&dir.join("mha"), "self_attn.")?;
//! let gqa = read.layer.to_gqa::<2>(KvInit::MeanPool);
//! checkpoint::try_write_layer(&dir.join("gqa"), "self_attn.", &gqa, read.dtype, &read.config)?;
//! let back = gqa::ModelConfig::from_json_file(dir.join("gqa/config.json"))?;
//! assert_eq!((back.num_attention_heads, back.num_key_value_heads), (8, 2));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), gqa::Error>(())
//! ```

use std::cell::OnceCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ndarray::{Array1, Array2};
use safetensors::{Dtype, SafeTensors, View};
use serde_json::Value;

use super::{AttentionLayer, Linear};
use crate::element::DType;
use crate::error::{Error, Result};
use crate::heads::{Rule, Supported, check_config};
use crate::model_config::ModelConfig;

/// The file a single-file checkpoint keeps its tensors in.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// The projections of a layer, in the order tensors are named and checked.
const PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/// A layer read from a checkpoint, with what writing it back needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCheckpoint<const HQ: usize, const HKV: usize, const D: usize>
where
    Rule: Supported<HQ, HKV, D>,
{
    pub layer: AttentionLayer<HQ, HKV, D>,
    /// The storage type of the layer's tensors (all of them share it).
    pub dtype: DType,
    /// The whole `config.json`, as read.
    pub config: Value,
}

/// Reads the layer whose tensors are named `{prefix}q_proj.weight`, … from the checkpoint in
/// `dir`. The configuration must obey the configuration rule ([`Error::Config`]) and say `HQ` attention heads, `HKV` key/value heads and head dim
/// `D` ([`Error::ConfigMismatch`] otherwise), and the tensors must have the shapes those and
/// the model width give. A missing or malformed file or tensor, a shape or storage type that
/// does not fit, is an [`Error::CheckpointTensor`] naming the tensor, or an
/// [`Error::Checkpoint`] naming the file.
pub fn try_read_layer<const HQ: usize, const HKV: usize, const D: usize>(
    dir: &Path,
    prefix: &str,
) -> Result<LayerCheckpoint<HQ, HKV, D>>
where
    Rule: Supported<HQ, HKV, D>,
{
    let (config, model) = read_config(dir, (HQ, HKV, D))?;
    let files = Files::open(dir)?;
    let mut dtype = None;
    let mut maps = Vec::with_capacity(4);
    for projection in PROJECTIONS {
        let weight_name = format!("{prefix}{projection}.weight");
        let (weight, weight_dtype) = files.read(&weight_name)?;
        let bias_name = format!("{prefix}{projection}.bias");
        let bias = files.read_optional(&bias_name)?;
        for (name, found) in std::iter::once((&weight_name, weight_dtype))
            .chain(bias.as_ref().map(|(_, d)| (&bias_name, *d)))
        {
            match dtype {
                None => dtype = Some((found, name.clone())),
                Some((first, ref first_name)) if first != found => {
                    return Err(files.tensor_error(
                        name,
                        format!(
                            "is {found} but `{first_name}` is {first}: a layer has one storage type"
                        ),
                    ));
                }
                _ => {}
            }
        }
        let weight = match weight.shape() {
            &[rows, cols] => {
                Array2::from_shape_vec((rows, cols), weight.into_raw_vec_and_offset().0)
                    .expect("shape of the data")
            }
            shape => {
                return Err(files.tensor_error(
                    &weight_name,
                    format!("has shape {shape:?}, expected a matrix [out, in]"),
                ));
            }
        };
        let bias = match bias {
            None => None,
            Some((b, _)) if b.ndim() == 1 && b.len() == weight.nrows() => {
                Some(Array1::from_vec(b.into_raw_vec_and_offset().0))
            }
            Some((b, _)) => {
                return Err(files.tensor_error(
                    &bias_name,
                    format!(
                        "has shape {:?}, expected [{}] (its weight's rows)",
                        b.shape(),
                        weight.nrows()
                    ),
                ));
            }
        };
        maps.push((weight_name, Linear { weight, bias }));
    }
    let hidden = model.hidden_size.unwrap_or(maps[0].1.inputs());
    for ((name, map), (rows, cols)) in maps.iter().zip([
        (HQ * D, hidden),
        (HKV * D, hidden),
        (HKV * D, hidden),
        (hidden, HQ * D),
    ]) {
        if map.weight.dim() != (rows, cols) || rows == 0 || cols == 0 {
            return Err(files.tensor_error(
                name,
                format!(
                    "has shape {:?}, expected [{rows}, {cols}] ({HQ} heads, {HKV} KV heads, head dim {D}, hidden size {hidden})",
                    map.weight.shape()
                ),
            ));
        }
    }
    let [q, k, v, o] = maps
        .into_iter()
        .map(|(_, map)| map)
        .collect::<Vec<_>>()
        .try_into()
        .expect("four projections");
    let layer = AttentionLayer::try_new(q, k, v, o)?;
    Ok(LayerCheckpoint {
        layer,
        dtype: dtype.expect("a weight was read").0,
        config,
    })
}

/// Writes `layer` into `dir` (created if needed) as a one-file checkpoint: its tensors named
/// under `prefix` in [`WEIGHTS_FILE`], stored as `dtype` (`F32`, `F16` or `BF16`; rounded to
/// nearest), and `config` as [`CONFIG_FILE`] with `num_attention_heads`,
/// `num_key_value_heads` and `head_dim` set to the layer's (and `multi_query`, where the config
/// has that key, to whether `HKV` is 1), every other field kept. A weight that `dtype` would
/// store as infinity is an [`Error::CheckpointTensor`], a config whose `hidden_size` is not the
/// layer's width an [`Error::ConfigMismatch`], and then nothing is written.
pub fn try_write_layer<const HQ: usize, const HKV: usize, const D: usize>(
    dir: &Path,
    prefix: &str,
    layer: &AttentionLayer<HQ, HKV, D>,
    dtype: DType,
    config: &Value,
) -> Result<()>
where
    Rule: Supported<HQ, HKV, D>,
{
    let weights_path = dir.join(WEIGHTS_FILE);
    let Some(storage) = storage_of(dtype) else {
        return Err(file_error(
            &weights_path,
            "gqa writes layers as F32, F16 or BF16, not F64".into(),
        ));
    };
    if dir.join(INDEX_FILE).exists() {
        // Readers take the index first: the new file would be ignored.
        return Err(file_error(
            &dir.join(INDEX_FILE),
            "the directory holds a sharded checkpoint's index; write the layer into another directory".into(),
        ));
    }
    let config = updated_config(config, (HQ, HKV, D), &dir.join(CONFIG_FILE))?;
    // The file would not read back (nor load elsewhere) if the config's width were not the
    // layer's.
    let text = serde_json::to_string(&config).expect("a JSON value prints");
    if let Some(found) = ModelConfig::from_json_str(&text)?.hidden_size
        && found != layer.hidden()
    {
        return Err(Error::ConfigMismatch {
            field: "hidden_size",
            expected: layer.hidden(),
            found,
        });
    }
    let mut tensors = Vec::with_capacity(8);
    for (projection, map) in
        PROJECTIONS
            .iter()
            .zip([&layer.q_proj, &layer.k_proj, &layer.v_proj, &layer.o_proj])
    {
        let name = format!("{prefix}{projection}.weight");
        let data = encode(
            &name,
            map.weight.iter().map(|&x| f64::from(x)),
            storage,
            &weights_path,
        )?;
        tensors.push((
            name,
            Stored::new(storage, map.weight.shape().to_vec(), data),
        ));
        if let Some(bias) = &map.bias {
            let name = format!("{prefix}{projection}.bias");
            let data = encode(
                &name,
                bias.iter().map(|&x| f64::from(x)),
                storage,
                &weights_path,
            )?;
            tensors.push((name, Stored::new(storage, vec![bias.len()], data)));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| file_error(dir, format!("cannot create the directory: {e}")))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| file_error(&weights_path, format!("cannot serialize: {e}")))?;
    std::fs::write(&weights_path, bytes)
        .map_err(|e| file_error(&weights_path, format!("cannot write it: {e}")))?;
    write_json(&dir.join(CONFIG_FILE), &config)
}

/// The `config.json` in `dir`, as JSON and as read by [`ModelConfig`]. Its numbers must obey
/// the configuration rule ([`Error::Config`]) and be `(q_heads, kv_heads, head_dim)`
/// ([`Error::ConfigMismatch`]).
fn read_config(
    dir: &Path,
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
) -> Result<(Value, ModelConfig)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| file_error(&path, format!("cannot read it: {e}")))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| file_error(&path, format!("not valid JSON: {e}")))?;
    let model = ModelConfig::from_json_str(&text)?;
    check_config(
        model.num_attention_heads,
        model.num_key_value_heads,
        model.head_dim,
    )?;
    for (field, expected, found) in [
        ("q_heads", q_heads, model.num_attention_heads),
        ("kv_heads", kv_heads, model.num_key_value_heads),
        ("head_dim", head_dim, model.head_dim),
    ] {
        if expected != found {
            return Err(Error::ConfigMismatch {
                field,
                expected,
                found,
            });
        }
    }
    Ok((config, model))
}

/// Writes `value` as pretty JSON and a newline to `path`.
fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("a JSON value prints");
    std::fs::write(path, text + "\n").map_err(|e| file_error(path, format!("cannot write it: {e}")))
}

/// The safetensors storage type of a weight type gqa reads and writes.
fn storage_of(dtype: DType) -> Option<Dtype> {
    match dtype {
        DType::F32 => Some(Dtype::F32),
        DType::F16 => Some(Dtype::F16),
        DType::BF16 => Some(Dtype::BF16),
        DType::F64 => None,
    }
}

/// The checkpoint's safetensors files: one, or the shards an index names.
struct Files {
    /// Each file's path and contents, read on first use.
    files: Vec<(PathBuf, OnceCell<Vec<u8>>)>,
    /// Tensor name → index into `files`, for a sharded checkpoint.
    index: Option<HashMap<String, usize>>,
    /// Where the tensors were looked for (for messages).
    origin: PathBuf,
}

impl Files {
    fn open(dir: &Path) -> Result<Files> {
        let single = dir.join(WEIGHTS_FILE);
        let index_path = dir.join(INDEX_FILE);
        if !index_path.exists() {
            return Ok(Files {
                files: vec![(single.clone(), OnceCell::new())],
                index: None,
                origin: single,
            });
        }
        let text = std::fs::read_to_string(&index_path)
            .map_err(|e| file_error(&index_path, format!("cannot read it: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| file_error(&index_path, format!("not valid JSON: {e}")))?;
        let Some(map) = value.get("weight_map").and_then(Value::as_object) else {
            return Err(file_error(&index_path, "no `weight_map` object".into()));
        };
        let mut files: Vec<(PathBuf, OnceCell<Vec<u8>>)> = Vec::new();
        let mut index = HashMap::new();
        for (tensor, file) in map {
            let Some(file) = file.as_str() else {
                return Err(file_error(
                    &index_path,
                    format!("`weight_map` gives `{tensor}` the file {file}, not a file name"),
                ));
            };
            let path = dir.join(file);
            let at = match files.iter().position(|(p, _)| *p == path) {
                Some(at) => at,
                None => {
                    files.push((path, OnceCell::new()));
                    files.len() - 1
                }
            };
            index.insert(tensor.clone(), at);
        }
        Ok(Files {
            files,
            index: Some(index),
            origin: index_path,
        })
    }

    /// The contents of `path` (one of `self.files`), read on first use.
    fn load<'a>(&self, path: &Path, cell: &'a OnceCell<Vec<u8>>) -> Result<&'a [u8]> {
        match cell.get() {
            Some(bytes) => Ok(bytes),
            None => {
                let bytes = std::fs::read(path)
                    .map_err(|e| file_error(path, format!("cannot read it: {e}")))?;
                Ok(cell.get_or_init(|| bytes))
            }
        }
    }

    /// The path of the file holding `name` and its contents (read on first use), or `None`
    /// when the index names no file for it.
    fn file_of(&self, name: &str) -> Option<(&Path, &OnceCell<Vec<u8>>)> {
        let at = match &self.index {
            None => 0,
            Some(index) => *index.get(name)?,
        };
        let (path, bytes) = &self.files[at];
        Some((path, bytes))
    }

    fn tensor_error(&self, tensor: &str, reason: String) -> Error {
        let file = self
            .file_of(tensor)
            .map_or(&*self.origin, |(path, _)| path)
            .display()
            .to_string();
        Error::CheckpointTensor {
            file,
            tensor: tensor.to_string(),
            reason,
        }
    }

    /// The tensor `name` as `f32` values with its shape, and its storage type; an error when it
    /// is missing.
    fn read(&self, name: &str) -> Result<(ndarray::ArrayD<f32>, DType)> {
        self.read_optional(name)?
            .ok_or_else(|| self.tensor_error(name, "is missing".into()))
    }

    /// [`Self::read`], with `None` for a tensor the checkpoint does not hold.
    fn read_optional(&self, name: &str) -> Result<Option<(ndarray::ArrayD<f32>, DType)>> {
        let Some((path, cell)) = self.file_of(name) else {
            return Ok(None);
        };
        let bytes = self.load(path, cell)?;
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| file_error(path, format!("not a valid safetensors file: {e}")))?;
        let view = match tensors.tensor(name) {
            Ok(view) => view,
            Err(safetensors::SafeTensorError::TensorNotFound(_)) if self.index.is_none() => {
                return Ok(None);
            }
            Err(e) => {
                return Err(self.tensor_error(name, format!("cannot be read: {e}")));
            }
        };
        let (values, dtype) = decode(&view).map_err(|reason| self.tensor_error(name, reason))?;
        let array = ndarray::ArrayD::from_shape_vec(view.shape().to_vec(), values)
            .expect("safetensors checked the data's length");
        Ok(Some((array, dtype)))
    }
}

/// A tensor's values as `f32` and its storage type; a storage type other than F32, F16 and
/// BF16 is the error's reason.
fn decode(view: &safetensors::tensor::TensorView<'_>) -> Result<(Vec<f32>, DType), String> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => (
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F32,
        ),
        Dtype::F16 => (
            data.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16,
        ),
        Dtype::BF16 => (
            data.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16,
        ),
        other => {
            return Err(format!(
                "is stored as {other}; gqa reads F32, F16 and BF16 weights"
            ));
        }
    })
}

/// `config` with the attention's numbers set: `num_attention_heads`, `num_key_value_heads`,
/// `head_dim`, the older names of the first two where the file uses them (`n_head`,
/// `num_kv_heads`), and `multi_query` where the file has that key. Multimodal configs that keep
/// the language model under `text_config` are updated there (as [`ModelConfig`] reads them).
fn updated_config(
    config: &Value,
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
    path: &Path,
) -> Result<Value> {
    let mut config = config.clone();
    let Some(object) = config.as_object_mut() else {
        return Err(file_error(
            path,
            "the configuration is not a JSON object".into(),
        ));
    };
    let top_level = object.contains_key("num_attention_heads") || object.contains_key("n_head");
    let object = match object.get_mut("text_config") {
        Some(Value::Object(text)) if !top_level => text,
        _ => object,
    };
    object.insert("num_attention_heads".into(), q_heads.into());
    object.insert("num_key_value_heads".into(), kv_heads.into());
    object.insert("head_dim".into(), head_dim.into());
    for (alias, value) in [("n_head", q_heads), ("num_kv_heads", kv_heads)] {
        if object.contains_key(alias) {
            object.insert(alias.into(), value.into());
        }
    }
    if object.contains_key("multi_query") {
        object.insert("multi_query".into(), (kv_heads == 1).into());
    }
    Ok(config)
}

/// `x` rounded to `f32` with round-to-odd: an inexact result keeps its last bit set. Rounding
/// that to a narrower type (f16, bf16: at least 2 bits fewer) to nearest gives the correctly
/// rounded narrow value of `x` — one rounding, where `x as f32` then to nearest can round twice.
fn round_to_odd(x: f64) -> f32 {
    let r = x as f32;
    if !x.is_finite() || f64::from(r) == x || r.to_bits() & 1 == 1 {
        return r;
    }
    // Inexact and even: the neighbour toward x is odd.
    let toward_zero = f64::from(r).abs() > x.abs();
    f32::from_bits(if toward_zero {
        r.to_bits() - 1
    } else {
        r.to_bits() + 1
    })
}

/// `values` rounded once to `storage` (to nearest, ties to even), as little-endian bytes; a
/// finite value that would become infinite is an error naming the tensor.
fn encode(
    name: &str,
    values: impl Iterator<Item = f64>,
    storage: Dtype,
    path: &Path,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for x in values {
        let (bytes, infinite): ([u8; 4], bool) = match storage {
            Dtype::F32 => {
                let r = x as f32;
                (r.to_le_bytes(), r.is_infinite())
            }
            Dtype::F16 => {
                let h = f16::from_f32(round_to_odd(x));
                let [a, b] = h.to_le_bytes();
                ([a, b, 0, 0], h.is_infinite())
            }
            Dtype::BF16 => {
                let h = bf16::from_f32(round_to_odd(x));
                let [a, b] = h.to_le_bytes();
                ([a, b, 0, 0], h.is_infinite())
            }
            _ => unreachable!("the storage types are checked by the caller"),
        };
        if infinite && x.is_finite() {
            return Err(Error::CheckpointTensor {
                file: path.display().to_string(),
                tensor: name.to_string(),
                reason: format!("holds {x}, which {storage} storage cannot represent"),
            });
        }
        out.extend_from_slice(&bytes[..storage.bitsize() / 8]);
    }
    Ok(out)
}

/// An owned tensor for `safetensors::serialize`.
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Stored {
    fn new(dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Stored {
        Stored { dtype, shape, data }
    }
}

impl View for Stored {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn file_error(path: &Path, reason: String) -> Error {
    Error::Checkpoint {
        file: path.display().to_string(),
        reason,
    }
}

/// What [`try_convert_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversion {
    /// The attention layers converted, by tensor-name prefix (`model.layers.0.self_attn.`, …),
    /// sorted.
    pub layers: Vec<String>,
    /// Tensors copied unchanged (bit for bit, in their storage type).
    pub copied: usize,
    /// The weight files written, as paths relative to the directory (the source's shard
    /// names, or [`WEIGHTS_FILE`]).
    pub weight_files: Vec<String>,
    /// Other files of the directory copied as they are (tokenizer, generation config, …).
    pub other_files: Vec<String>,
    /// Files left out: weights in other formats (`.bin`, `.pt`, `.pth`, `.ckpt`, `.h5`,
    /// `.msgpack`, `.gguf`), which would still hold the multi-head projections.
    pub left_out: Vec<String>,
}

/// Weight formats other than safetensors, which a conversion does not carry over.
const OTHER_WEIGHTS: [&str; 7] = [".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"];

/// The key and value tensors a conversion pools, by their name's ending.
const POOLED: [&str; 4] = [
    "k_proj.weight",
    "k_proj.bias",
    "v_proj.weight",
    "v_proj.bias",
];

/// Converts a whole multi-head model checkpoint in `src` into grouped-query attention with `G`
/// key/value heads, written to `dst` (created if needed; not `src`) so that it loads wherever
/// the original did:
///
/// - every attention layer's `k_proj` and `v_proj` (weights and biases) — the layers are the
///   prefixes of the `q_proj.weight` tensors — is pooled as
///   [`crate::layer::MhaLayer::to_gqa`] pools (means in `f64`, rounded once to the tensor's
///   storage type); random initialisation draws each tensor from `seed` and the tensor's name,
///   uniform in `±1/√hidden_size`;
/// - every other tensor is copied bit for bit into the same shard, with the file's own
///   metadata (an index's `weight_map` is kept and its `total_size` updated);
/// - `config.json` gets the new head numbers ([`try_write_layer`]'s rules), every other field
///   kept; the directory's other files are copied, except weights in other formats (listed in
///   [`Conversion::left_out`]).
///
/// Refused, before anything is written: a configuration other than `H` attention heads, `H`
/// key/value heads and head dim `D` ([`Error::ConfigMismatch`]); a model with no `q_proj`
/// tensors (fused projections — `qkv_proj`, `query_key_value`, `c_attn` — are not converted,
/// [`Error::Checkpoint`]); a key or value tensor whose shape is not `[H·D, hidden]` (`[H·D]` for
/// a bias) or whose storage type is not F32, F16 or BF16 ([`Error::CheckpointTensor`] naming it),
/// as in the vision tower of a multimodal model; `dst` naming `src`. Each source file is read
/// whole, once, and its converted twin written before the next is read.
pub fn try_convert_checkpoint<const H: usize, const G: usize, const D: usize>(
    src: &Path,
    dst: &Path,
    init: super::KvInit,
) -> Result<Conversion>
where
    Rule: Supported<H, H, D> + Supported<H, G, D>,
{
    let (config, model) = read_config(src, (H, H, D))?;
    if let (Ok(a), Ok(b)) = (src.canonicalize(), dst.canonicalize())
        && a == b
    {
        return Err(file_error(
            dst,
            "a conversion cannot write over its source".into(),
        ));
    }
    let files = Files::open(src)?;
    // Every tensor's name, type and shape, from the headers alone; the attention layers are
    // the prefixes of `q_proj.weight`.
    let mut headers = Vec::with_capacity(files.files.len());
    for (path, _) in &files.files {
        headers.push(header(path)?);
    }
    let mut layers: Vec<String> = headers
        .iter()
        .flatten()
        .filter_map(|(name, _)| name.strip_suffix("q_proj.weight").map(String::from))
        .collect();
    layers.sort();
    layers.dedup();
    if layers.is_empty() {
        return Err(file_error(
            &files.origin,
            "no attention layer has a `q_proj.weight`: models with fused projections (qkv_proj, query_key_value, c_attn) are not converted".into(),
        ));
    }
    let pooled = |name: &str| {
        POOLED.iter().any(|kind| {
            name.strip_suffix(kind)
                .is_some_and(|prefix| layers.binary_search(&prefix.to_string()).is_ok())
        })
    };
    // Each layer's width: the config's `hidden_size`, or its `q_proj.weight`'s columns. A
    // `q_proj.weight` must be `[H·D, hidden]`.
    let mut widths = HashMap::new();
    for ((path, _), tensors) in files.files.iter().zip(&headers) {
        for (name, (_, shape)) in tensors {
            let Some(prefix) = name.strip_suffix("q_proj.weight") else {
                continue;
            };
            let hidden = match (model.hidden_size, &shape[..]) {
                (Some(hidden), _) => hidden,
                (None, &[_, cols]) => cols,
                (None, _) => 0,
            };
            if !matches!(shape[..], [rows, cols] if rows == H * D && cols == hidden) {
                return Err(Error::CheckpointTensor {
                    file: path.display().to_string(),
                    tensor: name.clone(),
                    reason: format!(
                        "has shape {shape:?}, expected [{}, {hidden}] ({H} heads of dim {D}, hidden size {hidden}, as the config says)",
                        H * D
                    ),
                });
            }
            widths.insert(prefix.to_string(), hidden);
        }
    }
    // Every tensor to pool checked before anything is written.
    for ((path, _), tensors) in files.files.iter().zip(&headers) {
        for (name, (dtype, shape)) in tensors.iter().filter(|(name, _)| pooled(name)) {
            let hidden = POOLED
                .iter()
                .find_map(|kind| name.strip_suffix(kind))
                .and_then(|prefix| widths.get(prefix))
                .copied()
                .expect("a pooled tensor's layer has a q_proj.weight");
            let fits = match shape[..] {
                [rows, cols] => rows == H * D && cols == hidden,
                [rows] => rows == H * D && name.ends_with(".bias"),
                _ => false,
            };
            let reason = if !fits {
                format!(
                    "has shape {shape:?}, expected [{}, {hidden}] (a weight) or [{}] (a bias): {H} heads of dim {D}, hidden size {hidden}, as the config and the layer's q_proj say",
                    H * D,
                    H * D
                )
            } else if !matches!(dtype.as_str(), "F32" | "F16" | "BF16") {
                format!("is stored as {dtype}; gqa converts F32, F16 and BF16 weights")
            } else {
                continue;
            };
            return Err(Error::CheckpointTensor {
                file: path.display().to_string(),
                tensor: name.clone(),
                reason,
            });
        }
    }
    std::fs::create_dir_all(dst)
        .map_err(|e| file_error(dst, format!("cannot create the directory: {e}")))?;
    let (mut copied, mut total_size, mut weight_files) = (0, 0usize, Vec::new());
    for (path, _) in &files.files {
        // Read, converted and written one file at a time: one shard in memory at once.
        let bytes =
            std::fs::read(path).map_err(|e| file_error(path, format!("cannot read it: {e}")))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| file_error(path, format!("not a valid safetensors file: {e}")))?;
        let (_, metadata) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| file_error(path, format!("not a valid safetensors file: {e}")))?;
        let mut names: Vec<&str> = tensors.names();
        names.sort_unstable();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let view = tensors
                .tensor(name)
                .map_err(|e| file_error(path, format!("tensor `{name}` cannot be read: {e}")))?;
            let stored = if pooled(name) {
                convert_tensor::<H, G, D>(name, &view, init, model.hidden_size, path)?
            } else {
                copied += 1;
                Stored::new(view.dtype(), view.shape().to_vec(), view.data().to_vec())
            };
            total_size += stored.data.len();
            out.push((name.to_string(), stored));
        }
        let relative = path.strip_prefix(src).unwrap_or(path);
        let target = dst.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| file_error(parent, format!("cannot create the directory: {e}")))?;
        }
        let file_metadata = metadata
            .metadata()
            .clone()
            .unwrap_or_else(|| HashMap::from([("format".to_string(), "pt".to_string())]));
        let bytes = safetensors::serialize(out, Some(file_metadata))
            .map_err(|e| file_error(&target, format!("cannot serialize: {e}")))?;
        std::fs::write(&target, bytes)
            .map_err(|e| file_error(&target, format!("cannot write it: {e}")))?;
        weight_files.push(relative.to_string_lossy().into_owned());
    }
    if files.index.is_some() {
        let index_path = src.join(INDEX_FILE);
        let text = std::fs::read_to_string(&index_path)
            .map_err(|e| file_error(&index_path, format!("cannot read it: {e}")))?;
        let mut index: Value = serde_json::from_str(&text)
            .map_err(|e| file_error(&index_path, format!("not valid JSON: {e}")))?;
        if let Some(object) = index.as_object_mut() {
            let metadata = object
                .entry("metadata")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(metadata) = metadata.as_object_mut() {
                metadata.insert("total_size".into(), total_size.into());
            }
        }
        write_json(&dst.join(INDEX_FILE), &index)?;
    }
    let config = updated_config(&config, (H, G, D), &dst.join(CONFIG_FILE))?;
    write_json(&dst.join(CONFIG_FILE), &config)?;
    let (mut other_files, mut left_out) = (Vec::new(), Vec::new());
    let entries =
        std::fs::read_dir(src).map_err(|e| file_error(src, format!("cannot list it: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| file_error(src, format!("cannot list it: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !is_file || name == CONFIG_FILE || name == INDEX_FILE || name.ends_with(".safetensors") {
            continue;
        }
        if OTHER_WEIGHTS.iter().any(|ext| name.ends_with(ext)) {
            left_out.push(name);
            continue;
        }
        std::fs::copy(entry.path(), dst.join(&name))
            .map_err(|e| file_error(&entry.path(), format!("cannot copy it: {e}")))?;
        other_files.push(name);
    }
    other_files.sort();
    left_out.sort();
    Ok(Conversion {
        layers,
        copied,
        weight_files,
        other_files,
        left_out,
    })
}

/// A tensor's name, storage type (as safetensors spells it) and shape.
type TensorEntry = (String, (String, Vec<usize>));

/// The tensors in the safetensors file at `path` — name, storage type (as safetensors spells
/// it) and shape — sorted by name, read from its header alone (8 bytes of length, then that
/// much JSON).
fn header(path: &Path) -> Result<Vec<TensorEntry>> {
    use std::io::Read;
    let error =
        |reason: String| file_error(path, format!("not a valid safetensors file: {reason}"));
    let mut file =
        std::fs::File::open(path).map_err(|e| file_error(path, format!("cannot read it: {e}")))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|e| error(e.to_string()))?;
    let length = u64::from_le_bytes(length);
    // safetensors' own limit on a header.
    if length > 100_000_000 {
        return Err(error(format!("a header of {length} bytes")));
    }
    let mut text = vec![0u8; length as usize];
    file.read_exact(&mut text)
        .map_err(|e| error(e.to_string()))?;
    let mut entries: HashMap<String, Value> =
        serde_json::from_slice(&text).map_err(|e| error(e.to_string()))?;
    entries.remove("__metadata__");
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        let dtype = entry.get("dtype").and_then(Value::as_str);
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            });
        let (Some(dtype), Some(shape)) = (dtype, shape) else {
            return Err(error(format!("tensor `{name}` has no dtype or shape")));
        };
        tensors.push((name, (dtype.to_string(), shape)));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// One key or value tensor (`[H·D, hidden]` or `[H·D]`, checked by the caller) converted to
/// `G` heads as `init` says, in its own storage type.
fn convert_tensor<const H: usize, const G: usize, const D: usize>(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    init: super::KvInit,
    hidden: Option<usize>,
    path: &Path,
) -> Result<Stored> {
    let tensor_error = |reason: String| Error::CheckpointTensor {
        file: path.display().to_string(),
        tensor: name.to_string(),
        reason,
    };
    let (values, dtype) = decode(view).map_err(tensor_error)?;
    let cols = values.len() / (H * D);
    let shape = match view.shape() {
        [_, cols] => vec![G * D, *cols],
        _ => vec![G * D],
    };
    let x = ndarray::ArrayView2::from_shape((H * D, cols), &values).expect("shape checked");
    let pooled: Vec<f64> = match init {
        super::KvInit::Random { seed } => {
            // FNV-1a of the name: each tensor its own reproducible stream.
            let salt = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            let mut rng = fastrand::Rng::with_seed(seed ^ salt);
            super::uniform(G * D, cols, hidden.unwrap_or(cols), &mut rng)
                .iter()
                .map(|&x| f64::from(x))
                .collect()
        }
        init => {
            super::pool_rows_f64(x, H / G, D, init == super::KvInit::FirstHead)
                .into_raw_vec_and_offset()
                .0
        }
    };
    let storage = storage_of(dtype).expect("decode reads F32, F16 and BF16 only");
    let data = encode(name, pooled.into_iter(), storage, path)?;
    Ok(Stored::new(storage, shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mean of bf16 heads `[2, 2, 2⁻⁶, 2⁻²⁸]` is `1 + 2⁻⁸ + 2⁻³⁰`: above the tie between
    /// `1` and `1 + 2⁻⁷`, so it rounds up — rounded through f32 it would be the tie itself and
    /// round to even (`1`).
    #[test]
    fn means_are_rounded_once() {
        let mean = (2.0 + 2.0 + 2f64.powi(-6) + 2f64.powi(-28)) / 4.0;
        let bytes = encode("t", [mean].into_iter(), Dtype::BF16, Path::new("x")).unwrap();
        assert_eq!(
            bf16::from_le_bytes([bytes[0], bytes[1]]).to_f64(),
            1.0 + 2f64.powi(-7)
        );
        assert_eq!(
            bf16::from_f32(mean as f32).to_f64(),
            1.0,
            "the double rounding this avoids"
        );
        // Below the tie, the tie itself, and f16 likewise (10 bits: ulp 2⁻¹⁰ at 1).
        let below = 1.0 + 2f64.powi(-8) - 2f64.powi(-30);
        let bytes = encode(
            "t",
            [below, 1.0 + 2f64.powi(-8)].into_iter(),
            Dtype::BF16,
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(bf16::from_le_bytes([bytes[0], bytes[1]]).to_f64(), 1.0);
        assert_eq!(bf16::from_le_bytes([bytes[2], bytes[3]]).to_f64(), 1.0);
        let above = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        let bytes = encode("t", [above].into_iter(), Dtype::F16, Path::new("x")).unwrap();
        assert_eq!(
            f16::from_le_bytes([bytes[0], bytes[1]]).to_f64(),
            1.0 + 2f64.powi(-10)
        );
        // Negative values, and exact ones.
        let bytes = encode("t", [-mean, -0.5].into_iter(), Dtype::BF16, Path::new("x")).unwrap();
        assert_eq!(
            bf16::from_le_bytes([bytes[0], bytes[1]]).to_f64(),
            -(1.0 + 2f64.powi(-7))
        );
        assert_eq!(bf16::from_le_bytes([bytes[2], bytes[3]]).to_f64(), -0.5);
    }
}
