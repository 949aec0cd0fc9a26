//! The uptraining example's claims, on the example's own checkpoint and seeds (its procedure is
//! `examples/uptrain/lab.rs`, compiled into this test): mean-pooling starts closer to the MHA
//! block than the first-head and random initialisations for every `G` below the head count, and
//! uptraining reduces every converted block's error (a block that starts exact stays exact).

#[path = "../examples/uptrain/lab.rs"]
#[allow(dead_code)]
mod lab;

use lab::*;

#[test]
fn mean_pooling_starts_closest_and_uptraining_reduces_the_error() {
    let trained = train_mha(MHA_STEPS).unwrap();
    assert!(
        trained.last_loss < trained.first_loss / 10.0,
        "the MHA block did not learn its task: loss {} -> {}",
        trained.first_loss,
        trained.last_loss
    );
    let mha = trained.mha;
    let held_out = held_out(&mha).unwrap();
    let steps = ((MHA_STEPS as f64) * ALPHA).round() as usize;
    let rows = [
        uptrain::<1>(&mha, steps, &held_out).unwrap(),
        uptrain::<2>(&mha, steps, &held_out).unwrap(),
        uptrain::<4>(&mha, steps, &held_out).unwrap(),
        uptrain::<8>(&mha, steps, &held_out).unwrap(),
    ];
    for rows in &rows {
        let by = |name: &str| rows.iter().find(|r| r.init == name).unwrap();
        let (mean, first, random) = (by("mean-pool"), by("first head"), by("random"));
        let g = mean.kv_heads;
        if g < HEADS {
            assert!(
                mean.before < first.before && mean.before < random.before,
                "G={g}: mean-pool starts at {}, first head at {}, random at {}",
                mean.before,
                first.before,
                random.before
            );
        } else {
            // G = H: mean-pooling and first head are the MHA block itself.
            assert_eq!((mean.before, first.before), (0.0, 0.0), "G={g}");
        }
        for row in rows {
            if row.before == 0.0 {
                assert_eq!(
                    row.after, 0.0,
                    "G={g}, {}: an exact start stays exact",
                    row.init
                );
            } else {
                assert!(
                    row.after < row.before,
                    "G={g}, {}: uptraining took the error from {} to {}",
                    row.init,
                    row.before,
                    row.after
                );
            }
        }
        assert_eq!(mean.kv_bytes, (2 * g * HEAD_DIM * 2) as u128);
    }
}
