//! Reading a model's attention configuration from a Hugging Face `config.json`.
//!
//! The fields follow transformers' conventions: `num_key_value_heads` absent (or `null`) means
//! multi-head attention, `multi_query: true` (Falcon, StarCoder) means one KV head, and a missing
//! `head_dim` is `hidden_size / num_attention_heads`. Multimodal configs that nest the language
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
    pub num_hidden_layers: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    /// As written in the file; models differ on whether the window counts the query itself.
    pub sliding_window: Option<usize>,
    /// Gemma 2's `attn_logit_softcapping`.
    pub attn_logit_softcapping: Option<f64>,
    /// `torch_dtype` (or `dtype`), if it names a floating type gqa knows.
    pub dtype: Option<DType>,
}

impl ModelConfig {
    /// Parses the JSON text of a `config.json`.
    pub fn from_json_str(json: &str) -> Result<ModelConfig> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| reason(format!("not valid JSON: {e}")))?;
        let mut object = value
            .as_object()
            .ok_or_else(|| reason("the top level is not a JSON object".into()))?;
        if !object.contains_key("num_attention_heads")
            && let Some(text) = object.get("text_config").and_then(Value::as_object)
        {
            object = text;
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
        let num_attention_heads = count(object, "num_attention_heads")?
            .ok_or_else(|| reason("missing `num_attention_heads`".into()))?;
        let multi_query = object.get("multi_query").and_then(Value::as_bool) == Some(true);
        let num_key_value_heads = match count(object, "num_key_value_heads")? {
            Some(kv) => kv,
            None if multi_query => 1,
            None => num_attention_heads,
        };
        let head_dim = match count(object, "head_dim")? {
            Some(d) => d,
            None => {
                let hidden = count(object, "hidden_size")?.ok_or_else(|| {
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
        let dtype = ["torch_dtype", "dtype"]
            .iter()
            .find_map(|key| object.get(*key).and_then(Value::as_str))
            .and_then(DType::from_name);
        Ok(ModelConfig {
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_hidden_layers: count(object, "num_hidden_layers")?,
            max_position_embeddings: count(object, "max_position_embeddings")?,
            sliding_window: count(object, "sliding_window")?,
            attn_logit_softcapping: object.get("attn_logit_softcapping").and_then(Value::as_f64),
            dtype,
        })
    }
}

fn reason(reason: String) -> Error {
    Error::ModelConfig { reason }
}

/// A non-negative integer field; `Ok(None)` when absent or `null`.
fn count(object: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                reason(format!(
                    "`{key}` must be a non-negative integer, got {value}"
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(err("{").contains("not valid JSON"));
    }
}
