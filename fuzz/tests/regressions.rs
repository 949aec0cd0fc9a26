//! The fuzzer in CI: every saved input under `regressions/` replays without a finding, and a
//! short slice of fresh inputs (a fixed seed, a few seconds) runs every target — the kernels
//! too, on the device the kernel suites use, when there is one.

use std::path::Path;
use std::time::Duration;

use gqa_fuzz::driver::{self, Config};
use gqa_fuzz::{Env, Target};

fn env() -> Env {
    // The kernels when a device opens; under CI a missing device fails here as in the suites.
    match Env::new(true) {
        Ok(env) => env,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI needs a device for the fuzz slice: {e}")
        }
        Err(e) => {
            eprintln!("fuzz slice without the kernels ({e})");
            Env::new(false).unwrap()
        }
    }
}

#[test]
fn saved_inputs_replay_without_a_finding() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let (replayed, crashes) = driver::replay(&dir, &env());
    eprintln!("replayed {replayed} saved inputs");
    assert!(crashes.is_empty(), "{crashes:#?}");
}

#[test]
fn a_short_slice_of_every_target_finds_nothing() {
    let env = env();
    for target in Target::ALL {
        let config = Config {
            targets: vec![target],
            inputs: 4000,
            seconds: Some(2.0),
            seed: 0x5eed,
            timeout: Duration::from_secs(120),
            ..Config::default()
        };
        let report = driver::run(&config, &env);
        eprintln!("{report}");
        assert!(report.total_inputs() > 0);
        assert!(report.crashes.is_empty(), "{}", report);
    }
}
