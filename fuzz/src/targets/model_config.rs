//! `ModelConfig` from arbitrary JSON: raw bytes (mostly invalid) never panic; structured
//! objects — the fields gqa reads, each with a value of any JSON type, nested under
//! `text_config` or not — parse exactly when every field has its type, and then carry the
//! file's numbers; `DynAttention::try_from_model_config` accepts exactly the valid head splits.

use crate::Trace;
use arbitrary::{Result, Unstructured};
use gqa::{DType, DynAttention, ModelConfig};
use serde_json::{Map, Value, json};

const FIELDS: [&str; 11] = [
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "multi_query",
    "torch_dtype",
    "dtype",
    "num_hidden_layers",
    "max_position_embeddings",
    "sliding_window",
    "attn_logit_softcapping",
];

fn value(u: &mut Unstructured, depth: u32) -> Result<Value> {
    Ok(match u.int_in_range(0u8..=11)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2..=4 => json!(u.int_in_range(0u64..=512)?),
        5 => json!(u.arbitrary::<u64>()?),
        6 => json!(-(u.int_in_range(1i64..=i64::MAX)?)),
        7 => json!(f64::from(u.int_in_range(-2000i32..=2000)?) / 8.0),
        8 => Value::String(
            (*u.choose(&[
                "bfloat16",
                "float16",
                "float32",
                "torch.float16",
                "half",
                "float8_e4m3fn",
                "int8",
                "",
                "auto",
                "64",
            ])?)
            .into(),
        ),
        9 if depth < 2 => Value::Array(
            (0..u.int_in_range(0..=2)?)
                .map(|_| value(u, depth + 1))
                .collect::<Result<_>>()?,
        ),
        10 if depth < 2 => Value::Object(object(u, depth + 1)?),
        _ => json!(1e300),
    })
}

fn object(u: &mut Unstructured, depth: u32) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    for _ in 0..u.int_in_range(0..=12)? {
        let key = if u.ratio(1, 8)? {
            "unrelated".to_string()
        } else {
            (*u.choose(&FIELDS)?).to_string()
        };
        // Mostly sensible values, so that whole configs parse often enough.
        let v = if u.ratio(1, 2)? {
            match key.as_str() {
                "multi_query" => json!(u.arbitrary::<bool>()?),
                "torch_dtype" | "dtype" => json!(*u.choose(&["bfloat16", "float16", "float32"])?),
                "attn_logit_softcapping" => json!(f64::from(u.int_in_range(1u8..=60)?)),
                _ => json!(*u.choose(&[1u64, 2, 4, 8, 32, 64, 128, 4096])?),
            }
        } else {
            value(u, depth)?
        };
        map.insert(key, v);
    }
    Ok(map)
}

pub fn run(u: &mut Unstructured, t: &mut Trace) -> Result<()> {
    if u.ratio(1, 4)? {
        let len = u.len();
        let text = String::from_utf8_lossy(u.bytes(len)?).into_owned();
        let parsed = ModelConfig::from_json_str(&text);
        t.mark(if parsed.is_ok() { "raw ok" } else { "raw err" });
        return Ok(());
    }
    let mut top = object(u, 0)?;
    let nested = u.ratio(1, 4)?;
    if nested {
        let inner = object(u, 0)?;
        top.remove("num_attention_heads");
        top.insert("text_config".into(), Value::Object(inner));
    }
    // Falcon's `new_decoder_architecture`, drawn last (and left out when the input has no bytes
    // left) so that the saved inputs decode to the configs they were saved for.
    if !u.is_empty() && !u.ratio(3, 4)? {
        let v = if u.ratio(1, 2)? {
            json!(u.arbitrary::<bool>()?)
        } else {
            value(u, 0)?
        };
        let fields = match top.get_mut("text_config") {
            Some(Value::Object(inner)) if nested => inner,
            _ => &mut top,
        };
        fields.insert("new_decoder_architecture".into(), v);
    }
    let text = Value::Object(top.clone()).to_string();
    let parsed = ModelConfig::from_json_str(&text);
    let fields = if nested {
        top["text_config"].as_object().unwrap().clone()
    } else {
        top
    };
    // What the file says, by the field's own rules.
    let get = |k: &str| fields.get(k).filter(|v| !v.is_null());
    let count = |k: &str| get(k).map(|v| v.as_u64().map(|n| n as usize).ok_or(()));
    let typed_ok = [
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_size",
        "num_hidden_layers",
        "max_position_embeddings",
        "sliding_window",
    ]
    .iter()
    .all(|k| count(k).is_none_or(|c| c.is_ok()))
        && get("multi_query").is_none_or(Value::is_boolean)
        && get("new_decoder_architecture").is_none_or(Value::is_boolean)
        && ["torch_dtype", "dtype"].iter().all(|k| {
            get(k).is_none_or(|v| v.as_str().is_some_and(|s| DType::from_name(s).is_some()))
        })
        && get("attn_logit_softcapping")
            .is_none_or(|v| v.as_f64().is_some_and(|c| c.is_finite() && c > 0.0));
    let dtypes: Vec<DType> = ["torch_dtype", "dtype"]
        .iter()
        .filter_map(|k| get(k).and_then(Value::as_str).and_then(DType::from_name))
        .collect();
    let dtypes_agree = dtypes.windows(2).all(|w| w[0] == w[1]);
    let heads = count("num_attention_heads").and_then(|c| c.ok());
    let head_dim = count("head_dim").and_then(|c| c.ok()).or_else(|| {
        let hidden = count("hidden_size").and_then(|c| c.ok())?;
        let h = heads?;
        (h > 0 && hidden % h == 0).then(|| hidden / h)
    });
    let expected_ok = typed_ok && dtypes_agree && heads.is_some() && head_dim.is_some();
    match &parsed {
        Ok(config) => {
            assert!(expected_ok, "accepted a config with a bad field: {text}");
            assert_eq!(Some(config.num_attention_heads), heads);
            assert_eq!(Some(config.head_dim), head_dim);
            // transformers' Falcon rule: `multi_query` means one KV head, whatever count is
            // given, unless `new_decoder_architecture` is true.
            let mq = get("multi_query").and_then(Value::as_bool) == Some(true);
            let nd = get("new_decoder_architecture").and_then(Value::as_bool) == Some(true);
            let kv = if mq && !nd {
                1
            } else {
                count("num_key_value_heads")
                    .and_then(|c| c.ok())
                    .unwrap_or(config.num_attention_heads)
            };
            assert_eq!(config.num_key_value_heads, kv);
            assert_eq!(config.dtype, dtypes.first().copied());
            assert_eq!(
                config.attn_logit_softcapping,
                get("attn_logit_softcapping").and_then(Value::as_f64)
            );
            let dynamic = DynAttention::try_from_model_config(config);
            let (hq, hkv, d) = (
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
            );
            let rule = (1..=256).contains(&hq)
                && hkv >= 1
                && hkv <= hq
                && hq % hkv == 0
                && (1..=256).contains(&d);
            assert_eq!(dynamic.is_ok(), rule, "({hq}, {hkv}, {d}): {dynamic:?}");
            t.mark(if rule {
                "valid config"
            } else {
                "invalid split"
            });
        }
        Err(e) => {
            assert!(!expected_ok, "refused a valid config ({e}): {text}");
            assert!(matches!(e, gqa::Error::ModelConfig { .. }), "{e}");
            t.mark(
                e.to_string()
                    .split('`')
                    .nth(1)
                    .unwrap_or("error")
                    .to_string(),
            );
        }
    }
    Ok(())
}
