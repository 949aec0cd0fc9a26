//! Helpers shared by the bench binaries.
#![allow(dead_code)] // each bench binary uses some of these

#[cfg(feature = "cpu")]
pub mod ceiling;

/// `name` from the environment as a number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `name` from the environment as a comma-separated list of numbers, or `default`.
pub fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// `name` from the environment as a number, if set; a malformed value is an error.
pub fn env_f64(name: &str) -> Option<f64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// The median of `xs` (the upper one of an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median seconds of `a` and `b`, called alternately `runs` times after one untimed call each
/// (so that a shared machine's drift hits both alike).
pub fn alternate(runs: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    use std::time::Instant;
    a();
    b();
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        a();
        ta.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        b();
        tb.push(t.elapsed().as_secs_f64());
    }
    (median(ta), median(tb))
}

/// [`alternate`] for three calls: median seconds of `a`, `b` and `c`, called in turn.
pub fn alternate3(
    runs: usize,
    mut a: impl FnMut(),
    mut b: impl FnMut(),
    mut c: impl FnMut(),
) -> (f64, f64, f64) {
    use std::time::Instant;
    a();
    b();
    c();
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..runs {
        for (f, t) in [&mut a as &mut dyn FnMut(), &mut b, &mut c]
            .into_iter()
            .zip(&mut times)
        {
            let start = Instant::now();
            f();
            t.push(start.elapsed().as_secs_f64());
        }
    }
    let [a, b, c] = times.map(median);
    (a, b, c)
}

/// Document ids of `tokens` tokens in 8 documents of lengths proportional to 1..=8.
pub fn documents(tokens: usize) -> Vec<i32> {
    let weights: usize = (1..=8).sum();
    let mut doc = Vec::with_capacity(tokens);
    for d in 0..8 {
        let n = if d == 7 {
            tokens - doc.len()
        } else {
            tokens * (d + 1) / weights
        };
        doc.extend(std::iter::repeat_n(d as i32, n));
    }
    doc
}

/// Visible pairs of causal attention within each document.
pub fn visible_pairs(doc: &[i32]) -> f64 {
    let mut pairs = 0.0;
    let mut run = 0.0;
    for (t, &d) in doc.iter().enumerate() {
        run = if t > 0 && doc[t - 1] == d {
            run + 1.0
        } else {
            1.0
        };
        pairs += run;
    }
    pairs
}
