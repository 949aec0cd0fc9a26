//! Reading real models' attention configurations, written out here as the numbers their
//! `config.json` files publish, and checking them against the typed front end.

use gqa::{DType, DynAttention, Error, Gqa, Mha, ModelConfig, Mqa};

const LLAMA_3_8B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
  "max_position_embeddings": 8192, "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "vocab_size": 128256
}"#;

const LLAMA_2_7B: &str = r#"{
  "hidden_size": 4096, "max_position_embeddings": 4096, "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 32, "torch_dtype": "float16"
}"#;

const FALCON_7B: &str = r#"{
  "hidden_size": 4544, "multi_query": true, "n_layer": 32, "num_attention_heads": 71,
  "torch_dtype": "bfloat16"
}"#;

#[test]
fn llama_3_8b_is_gqa_32_8_128() {
    let config = ModelConfig::from_json_str(LLAMA_3_8B).unwrap();
    let typed = Gqa::<32, 8, 128>::try_from_model_config(&config).unwrap();
    assert_eq!(typed.spec().group_size(), 4);
    assert_eq!(config.dtype, Some(DType::BF16));
    // 32 layers · 2 · 8 heads · 128 · 2 bytes = 128 KiB per token; 1 GiB at 8192 tokens.
    let cache = typed.kv_cache(config.dtype.unwrap());
    assert_eq!(
        cache.bytes_per_token(config.num_hidden_layers.unwrap()),
        128 * 1024
    );
    assert_eq!(
        cache.bytes(32, 1, config.max_position_embeddings.unwrap()),
        1 << 30
    );
}

#[test]
fn llama_2_7b_is_mha_and_not_gqa() {
    let config = ModelConfig::from_json_str(LLAMA_2_7B).unwrap();
    assert!(Mha::<32, 128>::try_from_model_config(&config).is_ok());
    assert_eq!(
        Gqa::<32, 8, 128>::try_from_model_config(&config),
        Err(Error::ConfigMismatch {
            field: "kv_heads",
            expected: 8,
            found: 32
        })
    );
}

#[test]
fn falcon_7b_multi_query_is_mqa_71_64() {
    let config = ModelConfig::from_json_str(FALCON_7B).unwrap();
    assert_eq!(
        (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim
        ),
        (71, 1, 64)
    );
    let typed = Mqa::<71, 64>::try_from_model_config(&config).unwrap();
    assert_eq!(typed.kv_cache(DType::BF16).reduction_vs_mha(), 71);
}

#[test]
fn an_invalid_split_in_a_config_is_a_typed_error() {
    let config = ModelConfig::from_json_str(
        r#"{"num_attention_heads": 32, "num_key_value_heads": 6, "head_dim": 128}"#,
    )
    .unwrap();
    assert_eq!(
        DynAttention::try_from_model_config(&config)
            .unwrap_err()
            .to_string(),
        "32 query heads cannot be shared evenly by 6 key/value heads"
    );
}

#[test]
fn config_files_are_read_from_disk() {
    let path = std::env::temp_dir().join(format!("gqa-model-config-{}.json", std::process::id()));
    std::fs::write(&path, LLAMA_3_8B).unwrap();
    let read = ModelConfig::from_json_file(&path);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        read.unwrap(),
        ModelConfig::from_json_str(LLAMA_3_8B).unwrap()
    );
    let missing = ModelConfig::from_json_file("/nonexistent/config.json")
        .unwrap_err()
        .to_string();
    assert!(
        missing.starts_with("model config: cannot read /nonexistent/config.json"),
        "{missing}"
    );
}
