//! The fuzzer's command line.
//!
//! ```text
//! cargo run -p gqa-fuzz --release -- [--target NAME]... [--inputs N] [--seconds S] [--seed X]
//!                                    [--max-len BYTES] [--timeout S] [--cube] [--crashes DIR]
//!                                    [--replay DIR] [--stop-on-crash] [--progress S]
//! ```
//! Targets: spec, forward, cache, merge, model_config (all by default). `--inputs` is per
//! target; the run ends at `--inputs` or `--seconds`, whichever comes first. `--cube` also
//! launches the kernels (a few configurations) on the default device. Crashing and hanging
//! inputs are written under `--crashes` (default `fuzz/crashes`); copy one to
//! `fuzz/regressions/<target>/` to keep it as a regression test. Exit status: 0, 1 on a
//! crash, 2 on bad arguments, 3 on a hang.

use std::path::PathBuf;
use std::time::Duration;

use gqa_fuzz::driver::{self, Config};
use gqa_fuzz::{Env, Target};

fn main() {
    let mut config = Config {
        inputs: u64::MAX,
        seconds: Some(60.0),
        crash_dir: Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/crashes"
        ))),
        progress: Some(30.0),
        ..Config::default()
    };
    let mut targets = Vec::new();
    let mut cube = false;
    let mut replay: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    let fail = |message: String| -> ! {
        eprintln!("gqa-fuzz: {message}");
        std::process::exit(2)
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--target" => {
                let name = value("--target");
                targets.push(
                    Target::from_name(&name).unwrap_or_else(|| fail(format!("no target {name:?}"))),
                );
            }
            "--inputs" => {
                config.inputs = value("--inputs")
                    .parse()
                    .unwrap_or_else(|e| fail(format!("--inputs: {e}")))
            }
            "--seconds" => {
                config.seconds = Some(
                    value("--seconds")
                        .parse()
                        .unwrap_or_else(|e| fail(format!("--seconds: {e}"))),
                )
            }
            "--seed" => {
                config.seed = value("--seed")
                    .parse()
                    .unwrap_or_else(|e| fail(format!("--seed: {e}")))
            }
            "--max-len" => {
                config.max_len = value("--max-len")
                    .parse()
                    .unwrap_or_else(|e| fail(format!("--max-len: {e}")))
            }
            "--timeout" => {
                config.timeout = Duration::from_secs_f64(
                    value("--timeout")
                        .parse()
                        .unwrap_or_else(|e| fail(format!("--timeout: {e}"))),
                )
            }
            "--progress" => {
                config.progress = Some(
                    value("--progress")
                        .parse()
                        .unwrap_or_else(|e| fail(format!("--progress: {e}"))),
                )
            }
            "--crashes" => config.crash_dir = Some(PathBuf::from(value("--crashes"))),
            "--replay" => replay = Some(PathBuf::from(value("--replay"))),
            "--cube" => cube = true,
            "--stop-on-crash" => config.stop_on_crash = true,
            other => fail(format!(
                "unknown argument {other:?} (see the header of fuzz/src/main.rs)"
            )),
        }
    }
    if !targets.is_empty() {
        config.targets = targets;
    }
    let env = Env::new(cube).unwrap_or_else(|e| fail(format!("--cube: {e}")));
    if let Some(dir) = replay {
        let (replayed, crashes) = driver::replay(&dir, &env);
        println!(
            "replayed {replayed} inputs from {}: {} crash",
            dir.display(),
            crashes.len()
        );
        for crash in &crashes {
            println!("  {}: {}", crash.target.name(), crash.message);
        }
        std::process::exit(i32::from(!crashes.is_empty()));
    }
    eprintln!(
        "gqa-fuzz: seed {}, targets {:?}, {} inputs per target or {:?} s, kernels {}",
        config.seed,
        config.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        config.inputs,
        config.seconds,
        if cube { "on" } else { "off" }
    );
    let report = driver::run(&config, &env);
    println!("{report}");
    std::process::exit(i32::from(!report.crashes.is_empty()));
}
