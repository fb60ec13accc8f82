//! torchvision's resnet18 brought from PyTorch: `scripts/byom_torch.py`
//! builds the module tree of `torchvision.models.resnet18` (so its
//! state_dict names: `conv1`, `bn1`, `layer2.0.downsample.1.running_var`,
//! `fc`, ... and `num_batches_tracked`), with random weights and BatchNorm
//! statistics, and exports it with a card and the logits of a few inputs.
//!
//! - deadbolt loads it strictly and computes the same logits;
//! - a model pruned by deadbolt (layer3 and layer4 channels) and written
//!   back loads in PyTorch (strict) and gives deadbolt's masked logits;
//! - scan and repair run end to end on it (a smoke test with tiny budgets).

use std::path::Path;

use deadbolt_core::byom::card::{self, ModelCard};
use deadbolt_core::byom::repair::{self, RepairOptions};
use deadbolt_core::byom::scan::{self, ScanOptions};
use deadbolt_core::data::folder::Split;
use deadbolt_core::defense::cleanse::CleanseSpec;
use deadbolt_core::progress::Silent;
use tch::{Device, Tensor};

use deadbolt_test_support::torch::byom_torch as py;

fn tensor(path: &Path, name: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
}

fn logits(m: &deadbolt_core::model::Model, card: &ModelCard, x: &Tensor) -> Tensor {
    tch::no_grad(|| m.forward_t(&card.normalizer().apply(x), false))
}

#[test]
fn torchvision_resnet18_round_trips_through_pytorch() {
    tch::set_num_threads(2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = |p: &Path| p.display().to_string();
    py(&[
        "resnet18",
        "--out",
        &s(dir),
        "--channels",
        "3",
        "--size",
        "32",
        "--classes",
        "10",
    ]);
    let card = ModelCard::from_file(&dir.join("card.toml")).unwrap();
    let mut l = card::load_model(&dir.join("model.safetensors"), &card, Device::Cpu).unwrap();
    assert_eq!(l.extras.len(), 20, "one num_batches_tracked per BatchNorm");
    let io = dir.join("io.safetensors");
    let (x, want) = (tensor(&io, "images"), tensor(&io, "logits"));
    let got = logits(&l.model, &card, &x);
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(
        diff < 1e-4,
        "deadbolt's resnet18 differs from PyTorch's by {diff}"
    );

    // prune, write back, read in PyTorch
    l.model.prune_channels("layer3", &[1, 5, 9]).unwrap();
    l.model.prune_channels("layer4", &[2, 3, 500]).unwrap();
    let ours = logits(&l.model, &card, &x);
    assert!(
        (&ours - &want).abs().max().double_value(&[]) > 1e-4,
        "pruning changed nothing"
    );
    let out = dir.join("pruned/model.safetensors");
    card::save_state_dict(&l.model, &l.extras, &l.dtypes, &out).unwrap();
    std::fs::copy(dir.join("card.toml"), dir.join("pruned/card.toml")).unwrap();
    let theirs_file = dir.join("pruned/logits.safetensors");
    py(&[
        "logits",
        "--model",
        &s(&out),
        "--card",
        &s(&dir.join("pruned/card.toml")),
        "--images",
        &s(&io),
        "--out",
        &s(&theirs_file),
    ]);
    let theirs = tensor(&theirs_file, "logits");
    let diff = (&ours - &theirs).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "the pruned model differs in PyTorch by {diff}");
}

#[test]
fn scan_and_repair_run_on_resnet18() {
    tch::set_num_threads(2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = |p: &Path| p.display().to_string();
    py(&[
        "resnet18",
        "--out",
        &s(dir),
        "--channels",
        "3",
        "--size",
        "32",
        "--classes",
        "10",
        "--seed",
        "1",
    ]);
    // a tiny image folder: 4 RGB images per class
    let data = dir.join("data");
    for c in 0..10u8 {
        let d = data.join(format!("class{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..4u8 {
            image::RgbImage::from_fn(32, 32, |x, y| {
                image::Rgb([(x * 8) as u8 ^ c, (y * 8) as u8 ^ i, c.wrapping_mul(25)])
            })
            .save(d.join(format!("{i}.png")))
            .unwrap();
        }
    }
    let subject = scan::open(
        &dir.join("model.safetensors"),
        None,
        &data,
        Split::Test,
        None,
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(subject.layer, "layer4");
    let cleanse = CleanseSpec {
        steps: 4,
        images: 20,
        minibatch: 4,
        ..CleanseSpec::default()
    };
    let opts = ScanOptions {
        cleanse: cleanse.clone(),
        stats_images: 20,
        gradcam_images: 6,
        ..ScanOptions::default()
    };
    let r = scan::scan(&subject, &opts, &dir.join("scan"), &Silent).unwrap();
    assert_eq!(r.clp.scores.len(), 512);
    assert_eq!(r.clp.batch_norm.as_deref(), Some("layer4.1.bn2"));
    assert!(!r.reasons.is_empty());
    assert!(dir.join("scan/report.md").is_file());
    let ro = RepairOptions {
        cleanse,
        target_asr: 1.0,
        max_acc_drop: 1.0,
        holdout: 0.25,
        check_fraction: 0.25,
        fine_tune_epochs: 1,
        fine_tune_batch: 8,
        stats_images: 20,
        verify: false,
        ..RepairOptions::default()
    };
    let rr = repair::repair(&subject, &ro, &dir.join("repair"), &Silent).unwrap();
    assert_eq!(rr.k, 0);
    // the repaired file has the original names (and loads strictly)
    let back = card::load_model(&rr.repaired_model, &subject.loaded.card, Device::Cpu).unwrap();
    assert_eq!(back.extras.len(), 20);
}
