use super::*;
use tch::{Device, Kind, Tensor};

fn badnet() -> Model {
    crate::model::test_badnet(10, (28, 28), 0)
}

fn preact() -> Model {
    Model::seeded(
        ModelInfo {
            arch: Arch::PreactResnet18,
            classes: 10,
            input_shape: (3, 32, 32),
        },
        Device::Cpu,
        0,
    )
    .unwrap()
}

#[test]
fn badnet_names_and_shapes() {
    let m = badnet();
    assert_eq!(
        m.parameter_names(),
        [
            "conv1.bias",
            "conv1.weight",
            "conv2.bias",
            "conv2.weight",
            "fc1.bias",
            "fc1.weight",
            "fc2.bias",
            "fc2.weight"
        ]
    );
    let x = crate::rng::uniform(&[3, 1, 28, 28], 101);
    assert_eq!(m.forward_t(&x, false).size(), [3, 10]);
    assert_eq!(
        m.features_t(&x, "conv2", false).unwrap().size(),
        [3, 32, 8, 8]
    );
    assert_eq!(m.default_layer(), "conv2");
}

#[test]
fn preact_has_backdoorbench_names() {
    let m = preact();
    let names = m.parameter_names();
    for n in [
        "conv1.weight",
        "layer1.0.bn1.weight",
        "layer1.0.bn1.running_mean",
        "layer1.0.bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.1.conv2.weight",
        "layer2.0.shortcut.0.weight",
        "layer4.1.bn2.bias",
        "linear.weight",
        "linear.bias",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}");
    }
    assert!(!names.iter().any(|x| x.starts_with("layer1.0.shortcut")));
    let x = crate::rng::uniform(&[2, 3, 32, 32], 102);
    assert_eq!(
        m.features_t(&x, "layer4", false).unwrap().size(),
        [2, 512, 4, 4]
    );
    assert_eq!(m.forward_t(&x, false).size(), [2, 10]);
}

fn check_head_features(m: &mut Model, x: &Tensor) {
    for l in m.prunable_layers() {
        let f = m.features_t(x, &l.name, false).unwrap();
        let y = m.head_t(&f, &l.name, false).unwrap();
        assert!(
            y.allclose(&m.forward_t(x, false), 1e-5, 1e-5, false),
            "{}",
            l.name
        );
    }
}

#[test]
fn head_of_features_is_forward_and_masks_zero_channels() {
    let mut m = badnet();
    let x = crate::rng::uniform(&[4, 1, 28, 28], 103);
    check_head_features(&mut m, &x);
    m.prune_channels("conv2", &[3, 7]).unwrap();
    check_head_features(&mut m, &x);
    let f = m.features_t(&x, "conv2", false).unwrap();
    assert_eq!(f.select(1, 3).abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert_eq!(f.select(1, 7).abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert!(f.select(1, 4).abs().sum(Kind::Float).double_value(&[]) > 0.0);

    let mut p = preact();
    let x = crate::rng::uniform(&[2, 3, 32, 32], 104);
    p.prune_channels("layer4", &[0, 100]).unwrap();
    check_head_features(&mut p, &x);
}

#[test]
fn baked_masks_match_masked_inference() {
    for (mut m, layer, x) in [
        (badnet(), "conv2", crate::rng::uniform(&[3, 1, 28, 28], 105)),
        (badnet(), "conv1", crate::rng::uniform(&[3, 1, 28, 28], 106)),
        (
            preact(),
            "layer4",
            crate::rng::uniform(&[2, 3, 32, 32], 107),
        ),
        (
            preact(),
            "layer2",
            crate::rng::uniform(&[2, 3, 32, 32], 108),
        ),
    ] {
        m.prune_channels(layer, &[1, 5]).unwrap();
        let masked = m.forward_t(&x, false);
        m.bake_masks();
        assert!(m.mask(layer).is_none());
        assert!(
            m.forward_t(&x, false).allclose(&masked, 1e-5, 1e-5, false),
            "{layer}"
        );
    }
}

#[test]
fn save_and_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = badnet();
    let x = crate::rng::uniform(&[2, 1, 28, 28], 109);
    m.prune_channels("conv2", &[2]).unwrap();
    let want = m.forward_t(&x, false);
    let mut meta = CheckpointMeta::new(&m.info);
    meta.epoch = 3;
    m.save(dir.path(), &meta).unwrap();
    assert!(m.mask("conv2").is_some(), "saving keeps the live mask");
    let (loaded, meta2) = Model::load(dir.path(), Device::Cpu).unwrap();
    assert_eq!(meta2.epoch, 3);
    assert!(loaded
        .forward_t(&x, false)
        .allclose(&want, 1e-5, 1e-5, false));
}

#[test]
fn errors_name_the_problem() {
    let mut m = badnet();
    let x = crate::rng::uniform(&[1, 1, 28, 28], 110);
    let e = m.features_t(&x, "layer9", false).unwrap_err().to_string();
    assert!(e.contains("layer9") && e.contains("conv2"), "{e}");
    let e = m.prune_channels("conv2", &[32]).unwrap_err().to_string();
    assert!(e.contains("out of range"), "{e}");
    let e = m
        .set_mask("conv2", Some(Tensor::ones([5], (Kind::Float, Device::Cpu))))
        .unwrap_err()
        .to_string();
    assert!(e.contains("32 channels"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = Model::load(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.json"), "{e}");
    // corrupt weights
    m.save(dir.path(), &CheckpointMeta::new(&m.info)).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let e = Model::load(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let e = Model::new(
        ModelInfo {
            arch: Arch::BadnetCnn,
            classes: 10,
            input_shape: (1, 8, 8),
        },
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("16x16"), "{e}");
}

/// The unmasked fast path (pool before ReLU, channels-last pooling) gives
/// the staged forward's values exactly; gradients agree to float rounding
/// (libtorch sums the channels-last convolution backward in another order).
#[test]
fn fast_unmasked_forward_equals_the_staged_one() {
    let m = badnet();
    let x = crate::rng::uniform(&[4, 1, 28, 28], 111) * 2.0 - 1.0;
    let grads = |y: Tensor| -> Vec<Tensor> {
        for (_, mut v) in m.vs.variables() {
            v.zero_grad();
        }
        y.sum(Kind::Float).backward();
        let mut vars: Vec<(String, Tensor)> = m.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.iter().map(|(_, v)| v.grad().copy()).collect()
    };
    let fast = m.forward_t(&x, true);
    let staged = m.run(x.shallow_clone(), 0, m.net.stages().len(), true);
    assert!(fast.equal(&staged), "values differ");
    let (a, b) = (grads(fast), grads(staged));
    for (a, b) in a.iter().zip(&b) {
        let d = (a - b).abs().max().double_value(&[]);
        assert!(a.equal(b), "gradients differ by {d}");
    }
}
