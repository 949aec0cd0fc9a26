//! The fuzzing loop: inputs drawn from a seeded generator or mutated from a corpus of inputs
//! that showed new behaviour, each target run under `catch_unwind`, a watchdog for hangs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{Env, Target};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub targets: Vec<Target>,
    /// Inputs per target (the run stops at this count or at `seconds`, whichever comes first).
    pub inputs: u64,
    pub seconds: Option<f64>,
    pub seed: u64,
    /// The longest input drawn.
    pub max_len: usize,
    /// One input running longer than this is a hang: reported, saved, and the process exits.
    pub timeout: Duration,
    /// Where crashing and hanging inputs are written (`<dir>/<target>/<hash>`).
    pub crash_dir: Option<PathBuf>,
    /// Stop at the first crash.
    pub stop_on_crash: bool,
    /// Print a progress line every this many seconds (never if `None`).
    pub progress: Option<f64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            targets: Target::ALL.to_vec(),
            inputs: 1000,
            seconds: None,
            seed: 0,
            max_len: 4096,
            timeout: Duration::from_secs(60),
            crash_dir: None,
            stop_on_crash: false,
            progress: None,
        }
    }
}

/// One finding.
#[derive(Debug, Clone)]
pub struct Crash {
    pub target: Target,
    pub input: Vec<u8>,
    pub message: String,
}

/// What a run did, per target.
#[derive(Debug, Clone)]
pub struct TargetReport {
    pub target: Target,
    pub inputs: u64,
    pub seconds: f64,
    /// Distinct traces seen (behaviours).
    pub traces: usize,
    pub corpus: usize,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub targets: Vec<TargetReport>,
    pub crashes: Vec<Crash>,
}

impl Report {
    pub fn total_inputs(&self) -> u64 {
        self.targets.iter().map(|t| t.inputs).sum()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<13} {:>12} {:>9} {:>12} {:>8} {:>7}",
            "target", "inputs", "seconds", "inputs/s", "traces", "corpus"
        )?;
        for t in &self.targets {
            writeln!(
                f,
                "{:<13} {:>12} {:>9.1} {:>12.0} {:>8} {:>7}",
                t.target.name(),
                t.inputs,
                t.seconds,
                t.inputs as f64 / t.seconds.max(1e-9),
                t.traces,
                t.corpus
            )?;
        }
        let seconds: f64 = self.targets.iter().map(|t| t.seconds).sum();
        writeln!(
            f,
            "{:<13} {:>12} {:>9.1} {:>12.0}",
            "total",
            self.total_inputs(),
            seconds,
            self.total_inputs() as f64 / seconds.max(1e-9)
        )?;
        write!(f, "crashes: {}", self.crashes.len())?;
        for crash in &self.crashes {
            write!(
                f,
                "\n  {} ({} bytes): {}",
                crash.target.name(),
                crash.input.len(),
                crash.message
            )?;
        }
        Ok(())
    }
}

/// SplitMix64: small, seedable, good enough to draw bytes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// The message of the last panic, recorded by the hook [`quiet_panics`] installs (any thread:
/// a rayon worker's panic reaches the caller, its message is recorded where it happened).
fn last_panic() -> &'static Mutex<String> {
    static LAST: OnceLock<Mutex<String>> = OnceLock::new();
    LAST.get_or_init(|| Mutex::new(String::new()))
}

/// Replaces the panic hook by one that records the message and location instead of printing
/// them (targets catch documented panics on purpose; findings are reported by the driver).
pub fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = crate::panic_text(info.payload());
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            *last_panic().lock().unwrap_or_else(|e| e.into_inner()) = format!("{message}{at}");
        }));
    });
}

/// Runs one input; a panic becomes the crash's message.
pub fn run_one(target: Target, input: &[u8], env: &Env) -> Result<crate::Trace, String> {
    quiet_panics();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.run(input, env))).map_err(
        |_| {
            last_panic()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        },
    )
}

/// An input: fresh bytes, or a corpus entry with a few mutations.
fn next_input(rng: &mut Rng, corpus: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let length = |rng: &mut Rng| match rng.below(10) {
        0..=5 => rng.below(256.min(max_len) + 1),
        6..=8 => rng.below(2048.min(max_len) + 1),
        _ => rng.below(max_len + 1),
    };
    if corpus.is_empty() || rng.below(4) == 0 {
        let mut bytes = vec![0u8; length(rng)];
        rng.fill(&mut bytes);
        return bytes;
    }
    let mut bytes = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(8) {
        match rng.below(9) {
            0 if !bytes.is_empty() => {
                let at = rng.below(bytes.len());
                bytes[at] ^= 1 << rng.below(8);
            }
            1 if !bytes.is_empty() => {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next_u64() as u8;
            }
            2 if !bytes.is_empty() => {
                let at = rng.below(bytes.len());
                bytes[at] = [0, 1, 0x7f, 0x80, 0xfe, 0xff][rng.below(6)];
            }
            3 if !bytes.is_empty() => {
                let at = rng.below(bytes.len());
                bytes[at] = bytes[at].wrapping_add(if rng.below(2) == 0 { 1 } else { 255 });
            }
            4 if bytes.len() < max_len => {
                let at = rng.below(bytes.len() + 1);
                let mut extra = vec![0u8; 1 + rng.below(16)];
                rng.fill(&mut extra);
                bytes.splice(at..at, extra);
            }
            5 if !bytes.is_empty() => {
                let at = rng.below(bytes.len());
                let end = (at + 1 + rng.below(16)).min(bytes.len());
                bytes.drain(at..end);
            }
            6 if !bytes.is_empty() && bytes.len() < max_len => {
                let at = rng.below(bytes.len());
                let end = (at + 1 + rng.below(32)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                let to = rng.below(bytes.len() + 1);
                bytes.splice(to..to, copy);
            }
            7 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(bytes.len() + 1);
                let from = rng.below(other.len() + 1);
                bytes.truncate(cut);
                bytes.extend_from_slice(&other[from..]);
            }
            _ => {
                bytes.truncate(rng.below(bytes.len() + 1));
            }
        }
    }
    bytes.truncate(max_len);
    bytes
}

/// A stable name for an input's file.
pub fn input_name(input: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in input {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn save(dir: &Path, target: Target, input: &[u8], kind: &str) -> Option<PathBuf> {
    let dir = dir.join(target.name());
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{kind}-{}", input_name(input)));
    std::fs::write(&path, input).ok()?;
    Some(path)
}

/// The input running now and since when, for the watchdog.
struct Running {
    since_ms: AtomicU64,
    busy: AtomicBool,
    input: Mutex<(Target, Vec<u8>)>,
}

/// Runs the configured targets in turn (round-robin, one input each), each for `inputs`
/// inputs or until `seconds` have passed.
pub fn run(config: &Config, env: &Env) -> Report {
    quiet_panics();
    let start = Instant::now();
    let running = Arc::new(Running {
        since_ms: AtomicU64::new(0),
        busy: AtomicBool::new(false),
        input: Mutex::new((Target::Spec, Vec::new())),
    });
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (running, done) = (running.clone(), done.clone());
        let (timeout, crash_dir) = (config.timeout, config.crash_dir.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let since = running.since_ms.load(Ordering::Relaxed);
                let now = start.elapsed().as_millis() as u64;
                if running.busy.load(Ordering::Relaxed)
                    && now.saturating_sub(since) > timeout.as_millis() as u64
                {
                    let (target, input) = running.input.lock().unwrap().clone();
                    let saved = crash_dir
                        .as_deref()
                        .and_then(|d| save(d, target, &input, "hang"));
                    eprintln!(
                        "HANG: {} ran one input for more than {:?} ({} bytes, saved as {saved:?})",
                        target.name(),
                        timeout,
                        input.len()
                    );
                    std::process::exit(3);
                }
            }
        })
    };
    let mut rng = Rng::new(config.seed);
    let mut corpora: Vec<(Vec<Vec<u8>>, HashSet<u64>)> = config
        .targets
        .iter()
        .map(|_| (vec![Vec::new()], HashSet::new()))
        .collect();
    let mut reports: Vec<TargetReport> = config
        .targets
        .iter()
        .map(|&target| TargetReport {
            target,
            inputs: 0,
            seconds: 0.0,
            traces: 0,
            corpus: 0,
        })
        .collect();
    let mut crashes = Vec::new();
    let mut last_progress = Instant::now();
    'run: loop {
        let mut any = false;
        for (n, &target) in config.targets.iter().enumerate() {
            if reports[n].inputs >= config.inputs {
                continue;
            }
            if config
                .seconds
                .is_some_and(|s| start.elapsed().as_secs_f64() >= s)
            {
                break 'run;
            }
            any = true;
            let (corpus, traces) = &mut corpora[n];
            let input = next_input(&mut rng, corpus, config.max_len);
            {
                let mut slot = running.input.lock().unwrap();
                slot.0 = target;
                slot.1.clone_from(&input);
            }
            running
                .since_ms
                .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            running.busy.store(true, Ordering::Relaxed);
            let began = Instant::now();
            let outcome = run_one(target, &input, env);
            running.busy.store(false, Ordering::Relaxed);
            let report = &mut reports[n];
            report.seconds += began.elapsed().as_secs_f64();
            report.inputs += 1;
            match outcome {
                Ok(trace) => {
                    if traces.insert(trace.get()) {
                        if corpus.len() < 4096 {
                            corpus.push(input);
                        } else {
                            let at = rng.below(corpus.len());
                            corpus[at] = input;
                        }
                    }
                }
                Err(message) => {
                    if let Some(dir) = &config.crash_dir {
                        save(dir, target, &input, "crash");
                    }
                    crashes.push(Crash {
                        target,
                        input,
                        message,
                    });
                    if config.stop_on_crash {
                        break 'run;
                    }
                }
            }
            report.traces = traces.len();
            report.corpus = corpus.len();
        }
        if let Some(every) = config.progress
            && last_progress.elapsed().as_secs_f64() >= every
        {
            last_progress = Instant::now();
            let total: u64 = reports.iter().map(|r| r.inputs).sum();
            eprintln!(
                "{:>8.0} s: {total} inputs, {} crashes",
                start.elapsed().as_secs_f64(),
                crashes.len()
            );
        }
        if !any {
            break;
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    Report {
        targets: reports,
        crashes,
    }
}

/// Replays every input saved under `dir/<target>/` (regressions, crashes); returns the ones
/// that still crash.
pub fn replay(dir: &Path, env: &Env) -> (usize, Vec<Crash>) {
    let mut replayed = 0;
    let mut crashes = Vec::new();
    for target in Target::ALL {
        let Ok(entries) = std::fs::read_dir(dir.join(target.name())) else {
            continue;
        };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            replayed += 1;
            if let Err(message) = run_one(target, &input, env) {
                crashes.push(Crash {
                    target,
                    input,
                    message: format!("{}: {message}", path.display()),
                });
            }
        }
    }
    (replayed, crashes)
}
