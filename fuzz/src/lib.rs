//! Bounded fuzzing of `gqa`'s public `try_*` surface, on stable Rust.
//!
//! Each [`Target`] turns bytes into a structured sequence of calls (through
//! [`arbitrary::Unstructured`]) and checks, besides "no panic": the configuration rules
//! restated from their definitions, that every backend agrees with the f64 oracle under the
//! tolerance rule, that a cache refusing an operation holds exactly what it held before, that
//! partials merge only when they may. A panic is a finding, except the documented
//! `#[track_caller]` panics a target calls on purpose and recognises by their message
//! ([`documented_panic`]).
//!
//! The [`driver`] runs targets on inputs drawn from a seeded generator and mutated from a
//! corpus of inputs that showed new behaviour (a target's [`Trace`]), with a watchdog that
//! reports an input running longer than its time limit as a hang. `src/main.rs` is the command
//! line; `tests/` replays every input in `regressions/` and runs a short slice in CI.

pub mod driver;
pub mod targets;

use std::fmt;

/// What an input made a target do, as a hash of labels: inputs with a new trace join the
/// corpus (a poor man's coverage signal: which errors, which paths, which sizes).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Trace(u64);

impl Trace {
    /// Mixes a label into the trace.
    pub fn mark(&mut self, label: impl fmt::Display) {
        let text = label.to_string();
        let mut h = self.0 ^ 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 ^= h.rotate_left(17);
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

/// The targets, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `AttentionSpec`, `DynAttention` and `Mask` builders with arbitrary numbers; footprint
    /// arithmetic.
    Spec,
    /// `try_forward` of the oracle, the CPU backend and (when a device is open) the kernels,
    /// with arbitrary shapes and strides (reversed, broadcast, padded views).
    Forward,
    /// `KvCache` add / append / append_batch / drop / read / decode sequences, every storage.
    Cache,
    /// Partials over arbitrary key ranges and their merges.
    Merge,
    /// `ModelConfig` from arbitrary JSON, raw and structured.
    ModelConfig,
}

impl Target {
    pub const ALL: [Target; 5] = [
        Target::Spec,
        Target::Forward,
        Target::Cache,
        Target::Merge,
        Target::ModelConfig,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Spec => "spec",
            Target::Forward => "forward",
            Target::Cache => "cache",
            Target::Merge => "merge",
            Target::ModelConfig => "model_config",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Runs the target on one input. Running out of bytes ends an input early; that is not a
    /// finding.
    pub fn run(self, data: &[u8], env: &Env) -> Trace {
        let mut u = arbitrary::Unstructured::new(data);
        let mut trace = Trace::default();
        let result = match self {
            Target::Spec => targets::spec::run(&mut u, &mut trace),
            Target::Forward => targets::forward::run(&mut u, &mut trace, env),
            Target::Cache => targets::cache::run(&mut u, &mut trace),
            Target::Merge => targets::merge::run(&mut u, &mut trace),
            Target::ModelConfig => targets::model_config::run(&mut u, &mut trace),
        };
        if result.is_err() {
            trace.mark("out of bytes");
        }
        trace
    }
}

/// What the targets may use: the CPU backend, and a GPU device when one was asked for.
pub struct Env {
    pub cpu: gqa::cpu::Cpu,
    pub cube: Option<gqa::cube::CubeDevice>,
}

impl Env {
    /// The CPU backend on rayon's pool; the default cubecl device if `cube` (a missing device
    /// is then an error: a run that asked for the kernels must not silently skip them).
    pub fn new(cube: bool) -> Result<Env, gqa::Error> {
        Ok(Env {
            cpu: gqa::cpu::Cpu::new(),
            cube: if cube {
                Some(gqa::cube::CubeDevice::try_default()?)
            } else {
                None
            },
        })
    }
}

/// Runs `f`, which may panic only with a documented `#[track_caller]` panic whose message
/// contains `message`: `Some(value)` when it returned, `None` when it panicked so. Any other
/// panic goes on up (a finding).
pub fn documented_panic<R>(message: &str, f: impl FnOnce() -> R) -> Option<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(payload) => {
            let text = panic_text(&*payload);
            if text.contains(message) {
                None
            } else {
                std::panic::resume_unwind(payload)
            }
        }
    }
}

/// The message of a panic payload.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(a panic without a message)".into())
}

/// The name of an error's variant, for traces.
pub fn variant(error: &gqa::Error) -> String {
    let debug = format!("{error:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_string()
}
