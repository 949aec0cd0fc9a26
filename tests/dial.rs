//! The dial (`examples/dial.rs`, compiled into this test) on a checkpoint the test writes: a row
//! for every divisor of the heads, with the KV cache's bytes by the formula, the sequences that
//! fit the budget, a CPU decode time, the conversion's error (0 where nothing is pooled, above
//! 0 elsewhere), and the chart written.

#[path = "../examples/dial.rs"]
#[allow(dead_code)]
mod dial;

use std::cell::RefCell;

use gqa::DType;
use gqa::layer::{MhaLayer, checkpoint};
use serde_json::json;

#[test]
fn the_dial_measures_every_divisor_and_draws_its_chart() {
    let dir = std::env::temp_dir().join(format!("gqa-dial-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let prefix = "model.layers.0.self_attn.";
    let config = json!({
        "num_attention_heads": 8, "num_key_value_heads": 8, "hidden_size": 32,
        "num_hidden_layers": 3, "torch_dtype": "float16"
    });
    let mha = MhaLayer::<8, 16>::random(32, 11);
    checkpoint::try_write_layer(&dir, prefix, &mha, DType::F32, &config).unwrap();
    let chart = dir.join("dial.svg");
    let (context, memory_gib) = (96, 1u128);
    let mut options = dial::Options {
        config: dir.join("config.json").display().to_string(),
        context,
        memory_gib,
        steps: 2,
        cpu_only: true,
        checkpoint: Some(dir.display().to_string()),
        prefix: prefix.into(),
        chart: chart.display().to_string(),
        gpu_name: None,
        loaded: RefCell::new(None),
    };
    let rows = dial::run(&mut options).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.kv_heads).collect::<Vec<_>>(),
        [1, 2, 4, 8]
    );
    for row in &rows {
        let g = row.kv_heads as u128;
        // Keys and values, 16 channels per head, 2 bytes (f16), 3 layers.
        assert_eq!(row.per_token, 2 * g * 16 * 2 * 3, "G={g}");
        assert_eq!(row.per_sequence, row.per_token * context as u128, "G={g}");
        assert_eq!(
            row.sequences,
            (memory_gib << 30) / row.per_sequence,
            "G={g}"
        );
        let measured = row.measured.as_ref().expect("8 x 16 is compiled in");
        assert!(measured.notes.is_empty(), "G={g}: {:?}", measured.notes);
        assert!(measured.cpu_seconds.is_some_and(|s| s > 0.0), "G={g}");
        assert_eq!(measured.gpu_seconds, None, "G={g}: --cpu-only");
        let error = measured.error.expect("a checkpoint was given");
        if g == 8 {
            assert_eq!(error, 0.0, "nothing is pooled at G = H");
        } else {
            assert!(error > 0.0 && error.is_finite(), "G={g}: error {error}");
        }
    }
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.contains("KV heads") && svg.contains("conversion error"));

    // A checkpoint of another shape: every row still measured, the error a note on each.
    let other = dir.join("other");
    checkpoint::try_write_layer(&other, "elsewhere.", &mha, DType::F32, &config).unwrap();
    options.checkpoint = Some(other.display().to_string());
    options.loaded = RefCell::new(None);
    let rows = dial::run(&mut options).unwrap();
    for row in &rows {
        let measured = row.measured.as_ref().unwrap();
        assert!(measured.cpu_seconds.is_some(), "G={}", row.kv_heads);
        assert_eq!(measured.error, None);
        assert!(
            measured.notes.len() == 1 && measured.notes[0].contains("q_proj.weight"),
            "G={}: {:?}",
            row.kv_heads,
            measured.notes
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
