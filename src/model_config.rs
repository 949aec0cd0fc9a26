//! Reading a model's attention configuration from a Hugging Face `config.json`.
//!
//! The fields follow transformers' conventions: `num_key_value_heads` absent (or `null`) means
//! multi-head attention, `multi_query: true` (Falcon, StarCoder) means one KV head, and a missing
//! `head_dim` is `hidden_size / num_attention_heads`. Falcon's rule decides between the two
//! (transformers' `FalconAttention`): with `multi_query: true` the model has one KV head whatever
//! count the file also gives — transformers saves `num_kv_heads` (as the query heads) in every
//! Falcon config it writes — unless `new_decoder_architecture` is true (Falcon-40B and -180B),
//! where the count is the model's. Multimodal configs that nest the language
//! model under `text_config` are read from there.

use std::path::Path;

use serde_json::{Map, Value};

use crate::element::DType;
use crate::error::{Error, Result};

/// The attention-relevant part of a model configuration.
///
/// ```
/// use gqa::{DynAttention, ModelConfig};
/// let config = ModelConfig::from_json_str(r#"{
///     "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
///     "num_hidden_layers": 32, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"
/// }"#)?;
/// assert_eq!((config.num_key_value_heads, config.head_dim), (8, 128));
/// let attention = DynAttention::try_from_model_config(&config)?.causal();
/// assert_eq!(attention.spec().group_size(), 4);
/// # Ok::<(), gqa::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ModelConfig {
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// The model width, where the file gives it (the projections' input features).
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    /// As written in the file; models differ on whether the window counts the query itself.
    pub sliding_window: Option<usize>,
    /// Gemma 2's `attn_logit_softcapping` (a number `> 0`; `null` is `None`).
    pub attn_logit_softcapping: Option<f64>,
    /// `torch_dtype` (or `dtype`); a name gqa does not know is an error, not `None`.
    pub dtype: Option<DType>,
}

impl ModelConfig {
    /// Parses the JSON text of a `config.json`. Every field read must have its JSON type
    /// (`null` counts as absent); a wrong type, an unknown dtype name or a softcap that is not a
    /// number `> 0` is an [`Error::ModelConfig`] naming the field — never a silent default.
    pub fn from_json_str(json: &str) -> Result<ModelConfig> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| reason(format!("not valid JSON: {e}")))?;
        let mut object = value
            .as_object()
            .ok_or_else(|| reason("the top level is not a JSON object".into()))?;
        if !object.contains_key("num_attention_heads") && !object.contains_key("n_head") {
            match object.get("text_config") {
                None | Some(Value::Null) => {}
                Some(Value::Object(text)) => object = text,
                Some(other) => {
                    return Err(reason(format!(
                        "`text_config` must be a JSON object, got {other}"
                    )));
                }
            }
        }
        ModelConfig::from_object(object)
    }

    /// Reads and parses a `config.json` file.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<ModelConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| reason(format!("cannot read {}: {e}", path.display())))?;
        ModelConfig::from_json_str(&text)
    }

    fn from_object(object: &Map<String, Value>) -> Result<ModelConfig> {
        let num_attention_heads = aliased_count(object, "num_attention_heads")?
            .ok_or_else(|| reason("missing `num_attention_heads`".into()))?;
        let multi_query = flag(object, "multi_query")? == Some(true);
        let new_decoder = flag(object, "new_decoder_architecture")? == Some(true);
        let listed = aliased_count(object, "num_key_value_heads")?;
        let num_key_value_heads = if multi_query && !new_decoder {
            1
        } else {
            listed.unwrap_or(num_attention_heads)
        };
        // Read (and type-checked) even when `head_dim` makes it unnecessary: a malformed field
        // is an error wherever it is.
        let hidden_size = aliased_count(object, "hidden_size")?;
        let head_dim = match count(object, "head_dim")? {
            Some(d) => d,
            None => {
                let hidden = hidden_size.ok_or_else(|| {
                    reason("neither `head_dim` nor `hidden_size` is given".into())
                })?;
                if num_attention_heads == 0 || hidden % num_attention_heads != 0 {
                    return Err(reason(format!(
                        "no `head_dim`, and `hidden_size` {hidden} is not a multiple of `num_attention_heads` {num_attention_heads}"
                    )));
                }
                hidden / num_attention_heads
            }
        };
        // transformers writes `torch_dtype` (and, since v4.56, `dtype`): both are read, and
        // must agree when both are given.
        let mut dtype = None;
        for key in ["torch_dtype", "dtype"] {
            let Some(name) = text(object, key)? else {
                continue;
            };
            let parsed = DType::from_name(name).ok_or_else(|| {
                reason(format!(
                    "`{key}` is {name:?}, not a floating type gqa knows (float64, float32, float16, bfloat16)"
                ))
            })?;
            match dtype {
                Some(earlier) if earlier != parsed => {
                    return Err(reason(format!(
                        "`torch_dtype` and `dtype` disagree ({earlier} and {parsed})"
                    )));
                }
                _ => dtype = Some(parsed),
            }
        }
        let attn_logit_softcapping = match number(object, "attn_logit_softcapping")? {
            Some(cap) if !(cap.is_finite() && cap > 0.0) => {
                return Err(reason(format!(
                    "`attn_logit_softcapping` must be a number > 0 (or null), got {cap}"
                )));
            }
            cap => cap,
        };
        Ok(ModelConfig {
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_size,
            num_hidden_layers: aliased_count(object, "num_hidden_layers")?,
            max_position_embeddings: aliased_count(object, "max_position_embeddings")?,
            sliding_window: count(object, "sliding_window")?,
            attn_logit_softcapping,
            dtype,
        })
    }
}

fn reason(reason: String) -> Error {
    Error::ModelConfig { reason }
}

/// A field of one JSON type: `Ok(None)` when absent or `null`, `Ok(Some(x))` when `get` reads
/// it, else an error that names the field, what it should be and what it was.
fn field<'a, T>(
    object: &'a Map<String, Value>,
    key: &str,
    what: &str,
    get: impl FnOnce(&'a Value) -> Option<T>,
) -> Result<Option<T>> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => get(value)
            .map(Some)
            .ok_or_else(|| reason(format!("`{key}` must be {what}, got {value}"))),
    }
}

/// A non-negative integer field.
fn count(object: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    field(object, key, "a non-negative integer", |v| {
        v.as_u64().and_then(|n| usize::try_from(n).ok())
    })
}

/// Other names transformers' configs give a field (their `attribute_map`s): GPT-2's and the
/// original Falcon's `n_head`, `n_layer`, `n_embd`, `n_positions`, Falcon's `num_kv_heads`.
const ALIASES: &[(&str, &str)] = &[
    ("num_attention_heads", "n_head"),
    ("num_key_value_heads", "num_kv_heads"),
    ("num_hidden_layers", "n_layer"),
    ("hidden_size", "n_embd"),
    ("max_position_embeddings", "n_positions"),
];

/// [`count`] of `key` or its alias ([`ALIASES`]); both given and different is an error.
fn aliased_count(object: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    let value = count(object, key)?;
    let Some(&(_, alias)) = ALIASES.iter().find(|(k, _)| *k == key) else {
        return Ok(value);
    };
    match (value, count(object, alias)?) {
        (Some(a), Some(b)) if a != b => Err(reason(format!(
            "`{key}` ({a}) and its alias `{alias}` ({b}) disagree"
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

/// A boolean field.
fn flag(object: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    field(object, key, "true or false", Value::as_bool)
}

/// A number field.
fn number(object: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    field(object, key, "a number", Value::as_f64)
}

/// A string field.
fn text<'a>(object: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>> {
    field(object, key, "a string", Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_and_falcon_names_are_read() {
        let gpt2 = ModelConfig::from_json_str(
            r#"{"n_head": 12, "n_embd": 768, "n_layer": 12, "n_positions": 1024}"#,
        )
        .unwrap();
        assert_eq!(
            (
                gpt2.num_attention_heads,
                gpt2.num_key_value_heads,
                gpt2.head_dim
            ),
            (12, 12, 64)
        );
        assert_eq!(
            (
                gpt2.hidden_size,
                gpt2.num_hidden_layers,
                gpt2.max_position_embeddings
            ),
            (Some(768), Some(12), Some(1024))
        );
        let falcon_40b = ModelConfig::from_json_str(
            r#"{"num_attention_heads": 128, "num_kv_heads": 8, "hidden_size": 8192, "new_decoder_architecture": true}"#,
        )
        .unwrap();
        assert_eq!(falcon_40b.num_key_value_heads, 8);
        let error = ModelConfig::from_json_str(
            r#"{"num_attention_heads": 12, "n_head": 16, "head_dim": 64}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("`n_head` (16)"), "{error}");
    }

    #[test]
    fn missing_kv_heads_means_mha_and_multi_query_means_one() {
        let mha = ModelConfig::from_json_str(r#"{"num_attention_heads": 32, "hidden_size": 4096}"#)
            .unwrap();
        assert_eq!((mha.num_key_value_heads, mha.head_dim), (32, 128));
        let falcon = ModelConfig::from_json_str(
            r#"{"num_attention_heads": 71, "hidden_size": 4544, "multi_query": true}"#,
        )
        .unwrap();
        assert_eq!((falcon.num_key_value_heads, falcon.head_dim), (1, 64));
        // Falcon-7B's config as transformers writes it back: the count is the query heads',
        // the model has one KV head.
        let saved = ModelConfig::from_json_str(
            r#"{"num_attention_heads": 71, "num_kv_heads": 71, "hidden_size": 4544,
                "multi_query": true, "new_decoder_architecture": false}"#,
        )
        .unwrap();
        assert_eq!(saved.num_key_value_heads, 1);
        // Falcon-40B's new decoder counts its KV heads, `multi_query` or not.
        let falcon_40b = ModelConfig::from_json_str(
            r#"{"num_attention_heads": 128, "num_kv_heads": 8, "hidden_size": 8192,
                "multi_query": true, "new_decoder_architecture": true}"#,
        )
        .unwrap();
        assert_eq!(falcon_40b.num_key_value_heads, 8);
    }

    #[test]
    fn explicit_head_dim_wins_and_text_config_is_followed() {
        let gemma = ModelConfig::from_json_str(
            r#"{"text_config": {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                "hidden_size": 2304, "attn_logit_softcapping": 50.0, "sliding_window": 4096}}"#,
        )
        .unwrap();
        assert_eq!(
            (
                gemma.num_attention_heads,
                gemma.num_key_value_heads,
                gemma.head_dim
            ),
            (8, 4, 256)
        );
        assert_eq!(
            (gemma.attn_logit_softcapping, gemma.sliding_window),
            (Some(50.0), Some(4096))
        );
    }

    /// Every field read is checked for its type; nothing falls back to a default.
    #[test]
    fn every_field_read_refuses_a_wrong_type() {
        let base = r#""num_attention_heads": 8, "head_dim": 64"#;
        let err = |extra: &str| {
            ModelConfig::from_json_str(&format!("{{{base}, {extra}}}"))
                .unwrap_err()
                .to_string()
        };
        for (extra, message) in [
            (
                r#""attn_logit_softcapping": "50""#,
                "`attn_logit_softcapping` must be a number, got \"50\"",
            ),
            (
                r#""attn_logit_softcapping": 0"#,
                "`attn_logit_softcapping` must be a number > 0 (or null), got 0",
            ),
            (
                r#""attn_logit_softcapping": -30.0"#,
                "`attn_logit_softcapping` must be a number > 0 (or null), got -30",
            ),
            (
                r#""torch_dtype": "float8_e4m3fn""#,
                "`torch_dtype` is \"float8_e4m3fn\", not a floating type gqa knows (float64, float32, float16, bfloat16)",
            ),
            (r#""dtype": 16"#, "`dtype` must be a string, got 16"),
            (
                r#""torch_dtype": "bfloat16", "dtype": "float16""#,
                "`torch_dtype` and `dtype` disagree (bfloat16 and float16)",
            ),
            (
                r#""multi_query": "yes""#,
                "`multi_query` must be true or false, got \"yes\"",
            ),
            (
                r#""new_decoder_architecture": 1"#,
                "`new_decoder_architecture` must be true or false, got 1",
            ),
            (
                r#""sliding_window": 4096.5"#,
                "`sliding_window` must be a non-negative integer, got 4096.5",
            ),
            (
                r#""num_hidden_layers": "32""#,
                "`num_hidden_layers` must be a non-negative integer, got \"32\"",
            ),
            (
                r#""max_position_embeddings": true"#,
                "`max_position_embeddings` must be a non-negative integer, got true",
            ),
            (
                r#""num_key_value_heads": [8]"#,
                "`num_key_value_heads` must be a non-negative integer, got [8]",
            ),
            // Found by the fuzzer: with `head_dim` given, `hidden_size` was never looked at.
            (
                r#""hidden_size": -4096"#,
                "`hidden_size` must be a non-negative integer, got -4096",
            ),
        ] {
            assert_eq!(err(extra), format!("model config: {message}"), "{extra}");
        }
        // `null` is absent, as transformers writes it.
        let nulls = ModelConfig::from_json_str(&format!(
            r#"{{{base}, "attn_logit_softcapping": null, "torch_dtype": null, "sliding_window": null, "multi_query": null}}"#
        ))
        .unwrap();
        assert_eq!(
            (
                nulls.attn_logit_softcapping,
                nulls.dtype,
                nulls.sliding_window
            ),
            (None, None, None)
        );
        let both = ModelConfig::from_json_str(&format!(
            r#"{{{base}, "torch_dtype": "bfloat16", "dtype": "torch.bfloat16"}}"#
        ))
        .unwrap();
        assert_eq!(both.dtype, Some(DType::BF16));
    }

    #[test]
    fn bad_configs_say_why() {
        let err = |json: &str| ModelConfig::from_json_str(json).unwrap_err().to_string();
        assert_eq!(
            err(r#"{"hidden_size": 8}"#),
            "model config: missing `num_attention_heads`"
        );
        assert_eq!(
            err(r#"{"num_attention_heads": -4, "hidden_size": 8}"#),
            "model config: `num_attention_heads` must be a non-negative integer, got -4"
        );
        assert_eq!(
            err(r#"{"num_attention_heads": 3, "hidden_size": 8}"#),
            "model config: no `head_dim`, and `hidden_size` 8 is not a multiple of `num_attention_heads` 3"
        );
        assert!(err("[1, 2]").contains("not a JSON object"));
        assert_eq!(
            err(r#"{"text_config": 3}"#),
            "model config: `text_config` must be a JSON object, got 3"
        );
        assert!(err("{").contains("not valid JSON"));
    }
}
