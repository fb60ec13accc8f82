//! Training is deterministic on one machine: the same spec, seed and thread
//! count give the same weights and epoch figures, bit for bit, whether the
//! batch runs whole (one thread) or split over threads (two). And a split
//! batch's gradient is the whole batch's, to float rounding.
//!
//! One test function, run alone in this binary: libtorch's thread count is
//! process-wide, and the cases set it in turn.

use deadbolt_core::data::Dataset;
use deadbolt_core::model::{Model, ModelInfo};
use deadbolt_core::progress::Silent;
use deadbolt_core::spec::{Arch, OptimizerKind, TrainingSpec};
use deadbolt_core::train::{self, EpochReport};
use tch::{Device, Kind, Tensor};

/// Ten classes of noisy digits-like blobs: class c brightens row band c.
fn data(n: i64) -> Dataset {
    let x = deadbolt_core::rng::uniform(&[n, 1, 28, 28], 5) * 0.4;
    for i in 0..n {
        let c = i % 10;
        let _ = x.get(i).narrow(1, 2 + 2 * c, 3).g_add_scalar_(0.5);
    }
    let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(10);
    Dataset::new(x, y, 10, "bands").unwrap()
}

fn fresh() -> Model {
    let info = ModelInfo {
        arch: Arch::BadnetCnn,
        classes: 10,
        input_shape: (1, 28, 28),
    };
    Model::seeded(info, Device::Cpu, 1).unwrap()
}

fn run(d: &Dataset, spec: &TrainingSpec) -> (Model, Vec<EpochReport>) {
    let mut m = fresh();
    let r = train::train(
        &mut m,
        d,
        spec,
        3,
        train::Start::fresh(),
        &Silent,
        |_, _, _| Ok(()),
    )
    .unwrap();
    (m, r)
}

fn max_diff(a: &Model, b: &Model) -> f64 {
    let (va, vb) = (a.vs.variables(), b.vs.variables());
    va.iter()
        .map(|(k, t)| (t - &vb[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

#[test]
fn same_seed_and_threads_give_the_same_training() {
    let d = data(300);
    for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
        for threads in [1, 2] {
            let spec = TrainingSpec {
                optimizer: kind,
                epochs: 2,
                batch_size: 32,
                lr: if kind == OptimizerKind::Sgd {
                    0.05
                } else {
                    1e-3
                },
                momentum: 0.9,
                weight_decay: 5e-4,
                threads,
                ..Default::default()
            };
            let (a, ra) = run(&d, &spec);
            let (b, rb) = run(&d, &spec);
            for (x, y) in ra.iter().zip(&rb) {
                assert_eq!(
                    (x.loss.to_bits(), x.train_acc.to_bits()),
                    (y.loss.to_bits(), y.train_acc.to_bits()),
                    "{kind:?}, {threads} threads: epoch {} figures differ",
                    x.epoch
                );
            }
            let d_ab = max_diff(&a, &b);
            assert_eq!(d_ab, 0.0, "{kind:?}, {threads} threads: weights differ");
            assert!(ra[1].train_acc > 0.5, "{kind:?}, {threads} threads: {ra:?}");
        }
    }

    // one SGD step on one batch: split over two threads, the gradient is
    // the whole batch's up to float rounding
    let one = d.take(32);
    let spec = |threads| TrainingSpec {
        epochs: 1,
        batch_size: 32,
        lr: 0.1,
        momentum: 0.0,
        threads,
        ..Default::default()
    };
    let (whole, _) = run(&one, &spec(1));
    let (split, _) = run(&one, &spec(2));
    let start = fresh();
    let moved = max_diff(&whole, &start);
    let d = max_diff(&whole, &split);
    assert!(moved > 1e-3, "the step moved the weights ({moved})");
    assert!(d < 1e-6, "split and whole batch steps differ by {d}");
}
