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
    let config_path = dir.join(CONFIG_FILE);
    let config_text = std::fs::read_to_string(&config_path)
        .map_err(|e| file_error(&config_path, format!("cannot read it: {e}")))?;
    let config: Value = serde_json::from_str(&config_text)
        .map_err(|e| file_error(&config_path, format!("not valid JSON: {e}")))?;
    let model = ModelConfig::from_json_str(&config_text)?;
    check_config(
        model.num_attention_heads,
        model.num_key_value_heads,
        model.head_dim,
    )?;
    for (field, expected, found) in [
        ("q_heads", HQ, model.num_attention_heads),
        ("kv_heads", HKV, model.num_key_value_heads),
        ("head_dim", D, model.head_dim),
    ] {
        if expected != found {
            return Err(Error::ConfigMismatch {
                field,
                expected,
                found,
            });
        }
    }
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
/// store as infinity is an [`Error::CheckpointTensor`], and nothing is written.
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
    let storage = match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => {
            return Err(file_error(
                &weights_path,
                "gqa writes layers as F32, F16 or BF16, not F64".into(),
            ));
        }
    };
    let config = updated_config(config, (HQ, HKV, D), &dir.join(CONFIG_FILE))?;
    let mut tensors = Vec::with_capacity(8);
    for (projection, map) in
        PROJECTIONS
            .iter()
            .zip([&layer.q_proj, &layer.k_proj, &layer.v_proj, &layer.o_proj])
    {
        let name = format!("{prefix}{projection}.weight");
        let data = encode(&name, map.weight.iter().copied(), storage, &weights_path)?;
        tensors.push((
            name,
            Stored::new(storage, map.weight.shape().to_vec(), data),
        ));
        if let Some(bias) = &map.bias {
            let name = format!("{prefix}{projection}.bias");
            let data = encode(&name, bias.iter().copied(), storage, &weights_path)?;
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
    let config_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).expect("a JSON value prints");
    std::fs::write(&config_path, text + "\n")
        .map_err(|e| file_error(&config_path, format!("cannot write it: {e}")))?;
    Ok(())
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

/// `values` as little-endian bytes of `storage`; a finite value that would become infinite is
/// an error naming the tensor.
fn encode(
    name: &str,
    values: impl Iterator<Item = f32>,
    storage: Dtype,
    path: &Path,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for x in values {
        let bytes: [u8; 4];
        let slice: &[u8] = match storage {
            Dtype::F32 => {
                bytes = x.to_le_bytes();
                &bytes
            }
            Dtype::F16 | Dtype::BF16 => {
                let (bits, inf) = if storage == Dtype::F16 {
                    let h = f16::from_f32(x);
                    (h.to_bits(), h.is_infinite())
                } else {
                    let h = bf16::from_f32(x);
                    (h.to_bits(), h.is_infinite())
                };
                if inf && x.is_finite() {
                    return Err(Error::CheckpointTensor {
                        file: path.display().to_string(),
                        tensor: name.to_string(),
                        reason: format!("holds {x}, which {storage} storage cannot represent"),
                    });
                }
                bytes = [bits.to_le_bytes()[0], bits.to_le_bytes()[1], 0, 0];
                &bytes[..2]
            }
            _ => unreachable!("the storage types are checked by the caller"),
        };
        out.extend_from_slice(slice);
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
    /// The weight files written (the source's shard names, or [`WEIGHTS_FILE`]).
    pub weight_files: Vec<String>,
    /// Other files of the directory copied as they are (tokenizer, generation config, …).
    pub other_files: Vec<String>,
    /// Files left out: weights in other formats (`.bin`, `.pt`, `.pth`, `.ckpt`, `.h5`,
    /// `.msgpack`, `.gguf`), which would still hold the multi-head projections.
    pub left_out: Vec<String>,
}

/// Weight formats other than safetensors, which a conversion does not carry over.
const OTHER_WEIGHTS: [&str; 7] = [".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"];

/// Converts a whole multi-head model checkpoint in `src` into grouped-query attention with `G`
/// key/value heads, written to `dst` (created if needed) so that it loads wherever the original
/// did:
///
/// - every attention layer's `k_proj` and `v_proj` (weights and biases) — every prefix with a
///   `q_proj.weight` — is pooled as [`crate::layer::MhaLayer::to_gqa`] does (means in `f64`,
///   rounded once to the tensor's storage type; random initialisation draws each tensor from
///   `seed` and the tensor's name, uniform in `±1/√hidden_size`);
/// - every other tensor is copied bit for bit, in the same shard as before (the index's
///   `weight_map` is kept, its `total_size` updated);
/// - `config.json` gets the new head numbers ([`try_write_layer`]'s rules), every other field
///   kept; the directory's other files are copied, except weights in other formats (listed in
///   [`Conversion::left_out`]).
///
/// The source's configuration must say `H` attention heads, `H` key/value heads and head dim `D`
/// ([`Error::ConfigMismatch`]). A key or value tensor of an attention layer whose shape is not
/// `[H·D, hidden]` (or `[H·D]` for a bias) is an [`Error::CheckpointTensor`] naming it. Each
/// source file is read whole, once; each output file is written after its source is read.
pub fn try_convert_checkpoint<const H: usize, const G: usize, const D: usize>(
    src: &Path,
    dst: &Path,
    init: super::KvInit,
) -> Result<Conversion>
where
    Rule: Supported<H, H, D> + Supported<H, G, D>,
{
    let config_path = src.join(CONFIG_FILE);
    let config_text = std::fs::read_to_string(&config_path)
        .map_err(|e| file_error(&config_path, format!("cannot read it: {e}")))?;
    let config: Value = serde_json::from_str(&config_text)
        .map_err(|e| file_error(&config_path, format!("not valid JSON: {e}")))?;
    let model = ModelConfig::from_json_str(&config_text)?;
    check_config(
        model.num_attention_heads,
        model.num_key_value_heads,
        model.head_dim,
    )?;
    for (field, expected, found) in [
        ("q_heads", H, model.num_attention_heads),
        ("kv_heads", H, model.num_key_value_heads),
        ("head_dim", D, model.head_dim),
    ] {
        if expected != found {
            return Err(Error::ConfigMismatch {
                field,
                expected,
                found,
            });
        }
    }
    let files = Files::open(src)?;
    // Every tensor's name, file by file (from the headers alone): the attention layers are
    // the prefixes of `q_proj.weight`.
    let mut names_by_file = Vec::with_capacity(files.files.len());
    for (path, _) in &files.files {
        names_by_file.push(header_names(path)?);
    }
    let mut layers: Vec<String> = names_by_file
        .iter()
        .flatten()
        .filter_map(|name| name.strip_suffix("q_proj.weight").map(String::from))
        .collect();
    layers.sort();
    layers.dedup();
    std::fs::create_dir_all(dst)
        .map_err(|e| file_error(dst, format!("cannot create the directory: {e}")))?;
    let (mut copied, mut total_size, mut weight_files) = (0, 0usize, Vec::new());
    for ((path, _), names) in files.files.iter().zip(&names_by_file) {
        // Read, converted and written one file at a time: one shard in memory at once.
        let bytes =
            std::fs::read(path).map_err(|e| file_error(path, format!("cannot read it: {e}")))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| file_error(path, format!("not a valid safetensors file: {e}")))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let view = tensors
                .tensor(name)
                .map_err(|e| files.tensor_error(name, format!("cannot be read: {e}")))?;
            let pooled = [
                "k_proj.weight",
                "k_proj.bias",
                "v_proj.weight",
                "v_proj.bias",
            ]
            .iter()
            .any(|kind| {
                name.strip_suffix(kind)
                    .is_some_and(|prefix| layers.binary_search(&prefix.to_string()).is_ok())
            });
            let stored = if pooled {
                convert_tensor::<H, G, D>(name, &view, init, model.hidden_size, path)?
            } else {
                copied += 1;
                Stored::new(view.dtype(), view.shape().to_vec(), view.data().to_vec())
            };
            total_size += stored.data.len();
            out.push((name.clone(), stored));
        }
        let file_name = path
            .file_name()
            .expect("a weight file has a name")
            .to_string_lossy()
            .into_owned();
        let target = dst.join(&file_name);
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(out, Some(metadata))
            .map_err(|e| file_error(&target, format!("cannot serialize: {e}")))?;
        std::fs::write(&target, bytes)
            .map_err(|e| file_error(&target, format!("cannot write it: {e}")))?;
        weight_files.push(file_name);
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
        let target = dst.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).expect("a JSON value prints");
        std::fs::write(&target, text + "\n")
            .map_err(|e| file_error(&target, format!("cannot write it: {e}")))?;
    }
    let config = updated_config(&config, (H, G, D), &dst.join(CONFIG_FILE))?;
    let target = dst.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).expect("a JSON value prints");
    std::fs::write(&target, text + "\n")
        .map_err(|e| file_error(&target, format!("cannot write it: {e}")))?;
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

/// The names of the tensors in the safetensors file at `path`, sorted, read from its header
/// alone (8 bytes of length, then that much JSON).
fn header_names(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let error = |reason: String| file_error(path, reason);
    let mut file = std::fs::File::open(path).map_err(|e| error(format!("cannot read it: {e}")))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|e| error(format!("not a valid safetensors file: {e}")))?;
    let length = u64::from_le_bytes(length);
    // safetensors' own limit on a header.
    if length > 100_000_000 {
        return Err(error(format!(
            "not a valid safetensors file: a header of {length} bytes"
        )));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header)
        .map_err(|e| error(format!("not a valid safetensors file: {e}")))?;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| error(format!("not a valid safetensors header: {e}")))?;
    let mut names: Vec<String> = header
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect();
    names.sort();
    Ok(names)
}

/// One key or value tensor (`[H·D, hidden]` or `[H·D]`) converted to `G` heads as `init` says,
/// in its own storage type.
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
    let (rows, cols, shape) = match *view.shape() {
        [rows, cols] => (rows, cols, vec![G * D, cols]),
        [rows] => (rows, 1, vec![G * D]),
        ref other => {
            return Err(tensor_error(format!(
                "has shape {other:?}, expected [{}, hidden] or [{}]",
                H * D,
                H * D
            )));
        }
    };
    if rows != H * D {
        return Err(tensor_error(format!(
            "has {rows} rows, expected {} ({H} heads of dim {D}, as the config says)",
            H * D
        )));
    }
    let x = ndarray::ArrayView2::from_shape((rows, cols), &values).expect("shape of the data");
    let pooled: Vec<f32> = match init {
        super::KvInit::Random { seed } => {
            let hidden = hidden.unwrap_or(cols);
            // FNV-1a of the name: each tensor its own reproducible stream.
            let salt = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            let mut rng = fastrand::Rng::with_seed(seed ^ salt);
            let bound = 1.0 / (hidden.max(1) as f32).sqrt();
            (0..G * D * cols)
                .map(|_| (rng.f32() * 2.0 - 1.0) * bound)
                .collect()
        }
        init => {
            super::pool_rows(x, H / G, D, init == super::KvInit::FirstHead)
                .into_raw_vec_and_offset()
                .0
        }
    };
    let storage = match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => unreachable!("decode reads no F64"),
    };
    let data = encode(name, pooled.into_iter(), storage, path)?;
    Ok(Stored::new(storage, shape, data))
}
