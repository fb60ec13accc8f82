//! Bring your own model, bad inputs: each is a clear error naming the file
//! or the field at fault, from the entry point `deadbolt scan` and
//! `deadbolt repair` use ([`scan::open`]).

use std::path::{Path, PathBuf};

use deadbolt_core::byom::scan;
use deadbolt_core::data::folder::Split;
use deadbolt_core::model::{Model, ModelInfo};
use deadbolt_core::spec::Arch;
use tch::{Device, Tensor};

const CARD: &str = r#"
arch = "badnet-cnn"
input_shape = [1, 28, 28]
classes = 10
mean = [0.1307]
std = [0.3081]
"#;

/// A folder with a seeded badnet-cnn state_dict, its card and a small
/// image folder of 28x28 grey PNGs (two per class).
fn setup(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let info = ModelInfo {
        arch: Arch::BadnetCnn,
        classes: 10,
        input_shape: (1, 28, 28),
    };
    let m = Model::seeded(info, Device::Cpu, 1).unwrap();
    let weights = dir.join("model.safetensors");
    m.vs.save(&weights).unwrap();
    let card = dir.join("card.toml");
    std::fs::write(&card, CARD).unwrap();
    let data = dir.join("data");
    for c in 0..10 {
        let d = data.join(c.to_string());
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..2u8 {
            image::GrayImage::from_fn(28, 28, |x, y| {
                image::Luma([(x * 9 + y * 3) as u8 ^ (c * 20 + i)])
            })
            .save(d.join(format!("{i}.png")))
            .unwrap();
        }
    }
    (weights, card, data)
}

fn open_err(weights: &Path, card: &Path, data: &Path) -> String {
    let e = scan::open(weights, Some(card), data, Split::Test, None, Device::Cpu).unwrap_err();
    let s = e.to_string();
    println!("{s}");
    s
}

#[test]
fn good_inputs_open() {
    let dir = tempfile::tempdir().unwrap();
    let (w, c, d) = setup(dir.path());
    let s = scan::open(&w, Some(&c), &d, Split::Test, None, Device::Cpu).unwrap();
    assert_eq!(s.data.len(), 20);
    assert_eq!(s.layer, "conv2");
    // the card beside the model is found without --card
    let s = scan::open(&w, None, &d, Split::Test, None, Device::Cpu).unwrap();
    assert_eq!(s.loaded.card.classes, 10);
}

#[test]
fn state_dict_of_another_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let (_, c, d) = setup(dir.path());
    let other = Model::seeded(
        ModelInfo {
            arch: Arch::PreactResnet18,
            classes: 10,
            input_shape: (3, 32, 32),
        },
        Device::Cpu,
        2,
    )
    .unwrap();
    let w = dir.path().join("preact.safetensors");
    other.vs.save(&w).unwrap();
    let e = open_err(&w, &c, &d);
    assert!(e.contains("preact.safetensors"), "{e}");
    assert!(e.contains("missing") && e.contains("fc1.weight"), "{e}");
    assert!(
        e.contains("unexpected") && e.contains("layer1.0.bn1"),
        "{e}"
    );
    assert!(e.contains("arch"), "{e}");
}

#[test]
fn wrong_class_count() {
    let dir = tempfile::tempdir().unwrap();
    let (w, c, d) = setup(dir.path());
    std::fs::write(&c, CARD.replace("classes = 10", "classes = 5")).unwrap();
    let e = open_err(&w, &c, &d);
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(
        e.contains("fc2.weight") && e.contains("[10, 512]") && e.contains("[5, 512]"),
        "{e}"
    );
    assert!(e.contains("classes"), "{e}");
    // the data has more classes than the card: 10 class folders for 12
    std::fs::write(&c, CARD.replace("classes = 10", "classes = 12")).unwrap();
    let e = open_err(&w, &c, &d);
    assert!(e.contains("fc2.weight"), "{e}");
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (w, c, d) = setup(dir.path());
    let mut named = Tensor::read_safetensors(&w).unwrap();
    named.retain(|(n, _)| n != "conv2.bias");
    for (n, t) in named.iter_mut() {
        if n == "fc1.bias" {
            *t = Tensor::zeros([511], (tch::Kind::Float, Device::Cpu));
        }
    }
    Tensor::write_safetensors(&named, &w).unwrap();
    let e = open_err(&w, &c, &d);
    assert!(e.contains("conv2.bias") && e.contains("missing"), "{e}");
    assert!(e.contains("fc1.bias") && e.contains("[511]"), "{e}");
}

#[test]
fn empty_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (w, c, _) = setup(dir.path());
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("cats")).unwrap();
    std::fs::write(empty.join("cats/readme.txt"), "no images here").unwrap();
    let e = open_err(&w, &c, &empty);
    assert!(
        e.contains(&empty.display().to_string()) && e.contains("no images"),
        "{e}"
    );
    let e = open_err(&w, &c, &dir.path().join("nowhere"));
    assert!(e.contains("nowhere"), "{e}");
}

#[test]
fn corrupt_image() {
    let dir = tempfile::tempdir().unwrap();
    let (w, c, d) = setup(dir.path());
    std::fs::write(
        d.join("3/broken.png"),
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR garbage",
    )
    .unwrap();
    let e = open_err(&w, &c, &d);
    // refused from its header, before any pixels are decoded
    assert!(
        e.contains("3/broken.png") && e.contains("image header"),
        "{e}"
    );
    // a valid image of the wrong size is named too
    std::fs::remove_file(d.join("3/broken.png")).unwrap();
    image::GrayImage::new(32, 32)
        .save(d.join("4/big.png"))
        .unwrap();
    let e = open_err(&w, &c, &d);
    assert!(e.contains("4/big.png") && e.contains("32x32"), "{e}");
}

#[test]
fn card_with_negative_std() {
    let dir = tempfile::tempdir().unwrap();
    let (w, c, d) = setup(dir.path());
    std::fs::write(&c, CARD.replace("std = [0.3081]", "std = [-0.3081]")).unwrap();
    let e = open_err(&w, &c, &d);
    assert!(
        e.contains("std[0]") && e.contains("card.toml") && e.contains("-0.3081"),
        "{e}"
    );
    // other card faults name their key and the card
    std::fs::write(
        &c,
        CARD.replace("mean = [0.1307]", "mean = [0.1, 0.2, 0.3]"),
    )
    .unwrap();
    let e = open_err(&w, &c, &d);
    assert!(e.contains("mean") && e.contains("card.toml"), "{e}");
    std::fs::write(&c, CARD.replace("input_shape = [1, 28, 28]\n", "")).unwrap();
    let e = open_err(&w, &c, &d);
    assert!(e.contains("input_shape") && e.contains("card.toml"), "{e}");
    let j = dir.path().join("card.json");
    std::fs::write(
        &j,
        r#"{"arch": "badnet-cnn", "input_shape": [1, 28, 28], "classes": 10, "mean": [0.1], "std": [0]}"#,
    )
    .unwrap();
    let e = open_err(&w, &j, &d);
    assert!(e.contains("std[0]") && e.contains("card.json"), "{e}");
}
