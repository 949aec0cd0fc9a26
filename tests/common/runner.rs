//! How every property suite draws its cases: one seed per test, derived from the suite's and the
//! test's names, so that no two tests draw the same stream; failures that say how to replay
//! them; environment variables read strictly.
//!
//! | variable | meaning |
//! |---|---|
//! | `GQA_SEED=n` | mixes `n` into every test's seed: a new, reproducible set of cases for all tests |
//! | `GQA_RANDOM=1` | draws `GQA_SEED` at random for this run, and prints it |
//! | `GQA_CPU_CASES`, `GQA_CUBE_CASES`, `PROPTEST_CASES` | cases per test of the CPU, kernel and law suites |
//! | `GQA_SHRINK_ITERS` | how many simplifications a failing case is tried with (default 2048, at most 30 s) |
//! | `GQA_CASE_LOG=path` | appends one line per case checked (suite, test, batch, lengths, mask): how the distinct-case counts in the docs are measured |
//!
//! A failure prints the test's seed, the cases that passed before it, the shrunk failing case and
//! the one command that replays it (`GQA_SEED=… cargo test --test … -- --exact`). Malformed values
//! of these variables are errors, never a silent default.

use std::fmt::Debug;
use std::sync::OnceLock;

use proptest::strategy::Strategy;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};

/// The test binary's name (`cpu`, `cube_forward`, ...): `common` is compiled into each suite.
pub const SUITE: &str = env!("CARGO_CRATE_NAME");

/// `name` as a whole number, or `default` when unset. A value that is not one is a panic that
/// names the variable: a typo must not silently run the default.
#[track_caller]
pub fn env_count(name: &str, default: u32) -> u32 {
    count_value(name, read(name).as_deref(), default)
}

/// `name` as a switch: unset, `0`, `false`, `no`, `off` are off; `1`, `true`, `yes`, `on` are on;
/// anything else is a panic that names the variable.
#[track_caller]
pub fn env_flag(name: &str) -> bool {
    flag_value(name, read(name).as_deref())
}

#[track_caller]
fn read(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(text) => Some(text),
        Err(std::env::VarError::NotPresent) => None,
        Err(e) => panic!("{name} is not readable: {e}"),
    }
}

/// [`env_count`] of a value already read.
#[track_caller]
pub fn count_value(name: &str, text: Option<&str>, default: u32) -> u32 {
    text.map_or(default, |text| {
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number of cases, got {text:?}"))
    })
}

/// [`env_flag`] of a value already read.
#[track_caller]
pub fn flag_value(name: &str, text: Option<&str>) -> bool {
    match text.map(|t| t.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "0" | "false" | "no" | "off") => false,
        Some("1" | "true" | "yes" | "on") => true,
        Some(_) => panic!(
            "{name} must be 1/true/yes/on or 0/false/no/off, got {:?}",
            text.unwrap_or_default()
        ),
    }
}

/// The base every seed of this run is derived from: `GQA_SEED` (default 0), or a fresh random
/// number with `GQA_RANDOM=1` (printed once, so that the run can be repeated).
pub fn seed_base() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    *BASE.get_or_init(|| {
        let random = env_flag("GQA_RANDOM");
        match read("GQA_SEED") {
            Some(_) if random => panic!("GQA_SEED and GQA_RANDOM=1 are exclusive"),
            Some(text) => text
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("GQA_SEED must be a u64, got {text:?}")),
            None if random => {
                let base = fresh_seed();
                eprintln!(
                    "{SUITE}: GQA_RANDOM=1 drew GQA_SEED={base} (set it to run these cases again)"
                );
                base
            }
            None => 0,
        }
    })
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // The standard library's per-process random hasher keys, plus the clock.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// FNV-1a: a hash that is the same on every platform and Rust release (`DefaultHasher` is not
/// promised to be), so a seed printed today replays tomorrow.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64's finaliser: nearby inputs give unrelated seeds.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of test `test` of this suite in this run.
pub fn seed_for(test: &str) -> u64 {
    seed_of(seed_base(), SUITE, test)
}

/// The seed of test `test` of `suite` under `base`.
pub fn seed_of(base: u64, suite: &str, test: &str) -> u64 {
    mix(base ^ fnv1a(&format!("{suite}::{test}")))
}

/// How a failing case replays, in one command.
pub fn replay_command(test: &str) -> String {
    let features = if cfg!(feature = "vulkan") {
        " --features vulkan"
    } else {
        ""
    };
    format!(
        "GQA_SEED={} cargo test{features} --test {SUITE} {test} -- --exact",
        seed_base()
    )
}

/// What to keep of a run: whether failures are recorded in the suite's
/// `*.proptest-regressions` file (and replayed first next time).
#[derive(Clone, Copy)]
pub enum Persist {
    No,
    /// The source file of the suite (`file!()`).
    In(&'static str),
}

/// Runs `cases` cases of `strategy` through `body` with the seed of `test`; on failure panics
/// with the seed, the replay command and the shrunk case (shrinking stops after 30 s).
#[track_caller]
pub fn check<S>(
    test: &str,
    cases: u32,
    persist: Persist,
    strategy: S,
    body: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let seed = seed_for(test);
    let (failure_persistence, source_file) = match persist {
        Persist::No => (None, None),
        Persist::In(file) => (
            Some(
                Box::new(FileFailurePersistence::WithSource("proptest-regressions"))
                    as Box<dyn proptest::test_runner::FailurePersistence>,
            ),
            Some(file),
        ),
    };
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence,
        source_file,
        max_shrink_time: 30_000,
        max_shrink_iters: env_count("GQA_SHRINK_ITERS", 2048),
        ..Config::default()
    };
    let passed = std::cell::Cell::new(0u32);
    let result = TestRunner::new(config).run(&strategy, |value| {
        body(value)?;
        passed.set(passed.get() + 1);
        Ok(())
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, value)) => panic!(
            "\n{SUITE}::{test} failed (seed {seed:#018x}; {} case(s) passed before the first failure)\n\
             replay: {}\n\
             reason: {reason}\n\
             shrunk failing case: {value:#?}\n",
            passed.get(),
            replay_command(test)
        ),
        Err(TestError::Abort(reason)) => panic!(
            "\n{SUITE}::{test} aborted (seed {seed:#018x}): {reason}\nreplay: {}\n",
            replay_command(test)
        ),
    }
}

/// Appends a line to `GQA_CASE_LOG` (when set) for the case being checked: `key` says what
/// makes it distinct (batch, lengths, mask). The test is named by its thread (libtest names each
/// test's thread after it).
pub fn log_case(key: impl std::fmt::Display) {
    static LOG: OnceLock<Option<std::sync::Mutex<std::fs::File>>> = OnceLock::new();
    let log = LOG.get_or_init(|| {
        let path = std::env::var_os("GQA_CASE_LOG")?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("GQA_CASE_LOG {path:?}: {e}"));
        Some(std::sync::Mutex::new(file))
    });
    if let Some(file) = log {
        use std::io::Write;
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("?");
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(file, "{SUITE}\t{test}\t{key}").expect("GQA_CASE_LOG is writable");
    }
}

/// Property tests whose seed comes from their own name: like `proptest!`, but each test draws
/// its own cases (`runner::check`).
///
/// ```ignore
/// properties! {
///     cases = 256, persist;
///     /// The law, in words.
///     fn law_name(p in problem(), n in 0..4usize) { prop_assert!(...); }
/// }
/// ```
#[allow(unused_macros)]
macro_rules! properties {
    (cases = $cases:expr, $persist:ident; $(
        $(#[$meta:meta])*
        fn $name:ident($($arg:pat in $strategy:expr),+ $(,)?) $body:block
    )*) => {$(
        $(#[$meta])*
        #[test]
        fn $name() {
            crate::common::runner::check(
                stringify!($name),
                $cases,
                properties!(@persist $persist),
                ($($strategy,)+),
                |($($arg,)+)| -> Result<(), proptest::test_runner::TestCaseError> {
                    $body
                    #[allow(unreachable_code)]
                    Ok(())
                },
            );
        }
    )*};
    (@persist persist) => { crate::common::runner::Persist::In(file!()) };
    (@persist no_persist) => { crate::common::runner::Persist::No };
}
