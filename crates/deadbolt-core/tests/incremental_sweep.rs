//! The incremental pruning sweep (the head's pre-activations updated one
//! pruned channel at a time) against the whole head run per `k` on the
//! masked cached activations, on random badnet-cnn and preact-resnet18
//! models (a few seeds) and on a small trained badnet-cnn: the logits agree
//! to float tolerance for every `k`, and so do the predicted labels wherever
//! the reference's top two logits are not a near-tie.

use deadbolt_core::data::Dataset;
use deadbolt_core::defense::prune::{self, FeatureCache};
use deadbolt_core::eval::CurvePoint;
use deadbolt_core::model::{Model, ModelInfo};
use deadbolt_core::poison::TriggeredSet;
use deadbolt_core::progress::Silent;
use deadbolt_core::spec::{Arch, TrainingSpec};
use deadbolt_core::train;
use tch::{Device, Kind, Tensor};

fn model(arch: Arch, classes: i64, shape: (i64, i64, i64), seed: u64) -> Model {
    let info = ModelInfo {
        arch,
        classes,
        input_shape: shape,
    };
    Model::seeded(info, Device::Cpu, seed).unwrap()
}

fn sets(n: i64, classes: i64, (c, h, w): (i64, i64, i64), seed: u64) -> (Dataset, TriggeredSet) {
    let x = deadbolt_core::rng::uniform(&[n, c, h, w], seed);
    let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes);
    let d = Dataset::new(x, y, classes, "random").unwrap();
    let m = n / 2;
    let t = TriggeredSet {
        images: deadbolt_core::rng::uniform(&[m, c, h, w], seed + 1),
        labels: Tensor::arange(m, (Kind::Int64, Device::Cpu)).remainder(classes - 1) + 1,
        targets: Tensor::zeros([m], (Kind::Int64, Device::Cpu)),
    };
    (d, t)
}

/// The whole head's logits for `k`, from the masked cached activations.
fn head_logits(m: &Model, cache: &FeatureCache, order: &[i64], k: usize) -> Tensor {
    let keep = prune::keep_mask(cache.channels, order, k, Device::Cpu);
    let f = &cache.features * keep.view([1, -1, 1, 1]);
    tch::no_grad(|| m.head_t(&f, &cache.layer, false).unwrap())
}

/// Images whose two largest logits differ by less than `eps`.
fn near_ties(logits: &Tensor, eps: f64) -> Tensor {
    let (top, _) = logits.topk(2, 1, true, true);
    (top.select(1, 0) - top.select(1, 1)).lt(eps)
}

/// Checks every `k` of `order`; returns how many (k, image) pairs were
/// near-ties (skipped in the label comparison).
fn check(m: &Model, cache: &FeatureCache, order: &[i64], what: &str) -> i64 {
    assert!(cache.is_incremental(), "{what}: no incremental form");
    let ks = prune::all_ks(order.len() as i64);
    let fast = prune::incremental_logits(cache, order, &ks)
        .unwrap()
        .expect("incremental");
    let mut ties = 0;
    for &k in &ks {
        let want = head_logits(m, cache, order, k);
        let got = fast.get(k as i64);
        let diff = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]).max(1.0);
        assert!(
            diff <= 1e-4 * scale,
            "{what}, k = {k}: logits differ by {diff} (scale {scale})"
        );
        let tie = near_ties(&want, 1e-3 * scale);
        ties += tie.sum(Kind::Int64).int64_value(&[]);
        let same = got.argmax(1, false).eq_tensor(&want.argmax(1, false));
        let bad = same
            .logical_not()
            .logical_and(&tie.logical_not())
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert_eq!(bad, 0, "{what}, k = {k}: labels differ off near-ties");
    }
    // the figures of the sweep (every k, and a sparse unsorted set of ks
    // with a repeat) against the head per k
    let n = cache.features.size()[0] as f64;
    let tolerance = ties as f64 / n + 1e-12;
    let close = |a: &[CurvePoint], b: &[CurvePoint]| {
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(b) {
            assert_eq!(a.k, b.k, "{what}");
            for (x, y) in [(a.acc, b.acc), (a.asr, b.asr), (a.ra, b.ra)] {
                assert!((x - y).abs() <= tolerance, "{what}: {a:?} vs {b:?}");
            }
        }
    };
    close(
        &prune::sweep_cached(m, cache, order, &ks).unwrap(),
        &prune::sweep_cached_heads(m, cache, order, &ks).unwrap(),
    );
    let last = order.len();
    let sparse = [last, 3, 0, 3, last / 2];
    close(
        &prune::sweep_cached(m, cache, order, &sparse).unwrap(),
        &prune::sweep_cached_heads(m, cache, order, &sparse).unwrap(),
    );
    ties
}

#[test]
fn badnet_incremental_sweep_equals_the_head_per_k() {
    for seed in 0..3 {
        let m = model(Arch::BadnetCnn, 10, (1, 28, 28), seed);
        let (d, t) = sets(60, 10, (1, 28, 28), 100 + seed);
        let cache = prune::cache_features(&m, "conv2", &d, &t).unwrap();
        let mut order: Vec<i64> = (0..32).collect();
        order.rotate_left(seed as usize * 5);
        order.reverse();
        check(&m, &cache, &order, &format!("badnet seed {seed}"));
        // an order covering only some channels
        check(
            &m,
            &cache,
            &order[..7],
            &format!("badnet seed {seed}, 7 channels"),
        );
    }
}

#[test]
fn badnet_own_mask_and_other_layers() {
    let mut m = model(Arch::BadnetCnn, 10, (1, 28, 28), 7);
    let (d, t) = sets(40, 10, (1, 28, 28), 200);
    // the model's own mask on the layer stays in effect under the sweep's
    m.prune_channels("conv2", &[4, 9]).unwrap();
    let cache = prune::cache_features(&m, "conv2", &d, &t).unwrap();
    let order: Vec<i64> = (0..32).rev().collect();
    check(&m, &cache, &order, "badnet with its own mask");
    let ks = prune::all_ks(32);
    let naive = prune::sweep_naive(&mut m, "conv2", &d, &t, &order, &ks).unwrap();
    let fast = prune::sweep_cached(&m, &cache, &order, &ks).unwrap();
    for (a, b) in fast.iter().zip(&naive) {
        assert!((a.acc - b.acc).abs() < 0.05 && (a.asr - b.asr).abs() < 0.05);
    }
    // conv1's head runs conv2 (channels mixed after a ReLU): no incremental
    // form, the head per k instead
    let cache = prune::cache_features(&m, "conv1", &d, &t).unwrap();
    assert!(!cache.is_incremental());
    assert!(prune::incremental_logits(&cache, &[0, 1], &[0, 1])
        .unwrap()
        .is_none());
    let order: Vec<i64> = (0..16).collect();
    let ks = prune::all_ks(16);
    assert_eq!(
        prune::sweep_cached(&m, &cache, &order, &ks).unwrap(),
        prune::sweep_cached_heads(&m, &cache, &order, &ks).unwrap()
    );
    let e = prune::incremental_logits(&cache, &order, &[2, 1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("ascending"), "{e}");
}

#[test]
fn preact_incremental_sweep_equals_the_head_per_k() {
    for seed in 0..2 {
        let m = model(Arch::PreactResnet18, 10, (3, 32, 32), seed);
        let (d, t) = sets(16, 10, (3, 32, 32), 300 + seed);
        let cache = prune::cache_features(&m, "layer4", &d, &t).unwrap();
        let mut order: Vec<i64> = (0..512).collect();
        order.rotate_left(seed as usize * 101);
        check(&m, &cache, &order, &format!("preact seed {seed}"));
        // layer3's head runs layer4's blocks: no incremental form
        let cache = prune::cache_features(&m, "layer3", &d, &t).unwrap();
        assert!(!cache.is_incremental());
    }
}

#[test]
fn trained_badnet_incremental_sweep_equals_the_head_per_k() {
    // two classes: a bright top half or a bright bottom half
    let n = 256;
    let x = deadbolt_core::rng::uniform(&[n, 1, 16, 16], 11) * 0.3;
    for i in 0..n {
        let half = if i % 2 == 0 { 0 } else { 8 };
        let _ = x.get(i).narrow(1, half, 8).g_add_scalar_(0.6);
    }
    let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(2);
    let d = Dataset::new(x, y, 2, "halves").unwrap();
    let mut m = model(Arch::BadnetCnn, 2, (1, 16, 16), 3);
    let spec = TrainingSpec {
        epochs: 3,
        batch_size: 16,
        lr: 0.05,
        ..Default::default()
    };
    train::train(
        &mut m,
        &d,
        &spec,
        0,
        train::Start::fresh(),
        &Silent,
        |_, _, _| Ok(()),
    )
    .unwrap();
    let t = TriggeredSet {
        images: d.images.narrow(0, 0, 64).flip([2]),
        labels: d.labels.narrow(0, 0, 64),
        targets: Tensor::zeros([64], (Kind::Int64, Device::Cpu)),
    };
    let cache = prune::cache_features(&m, "conv2", &d, &t).unwrap();
    let curve = prune::sweep_cached(&m, &cache, &(0..32).collect::<Vec<_>>(), &[0]).unwrap();
    assert!(curve[0].acc > 0.9, "the model learned: {curve:?}");
    for (i, order) in [
        (0..32).collect::<Vec<i64>>(),
        (0..32).rev().collect(),
        (0..32).map(|c| (c * 7) % 32).collect(),
    ]
    .iter()
    .enumerate()
    {
        check(&m, &cache, order, &format!("trained badnet, order {i}"));
    }
}
