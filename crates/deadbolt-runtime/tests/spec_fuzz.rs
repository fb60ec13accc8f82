//! Random and mutated specs, as TOML and as proto, fed to the validation at
//! the edge (`convert::spec_from_submit`): it never panics, and every
//! rejection is INVALID_ARGUMENT naming at least one field under `spec`.

use deadbolt_proto::v1 as pb;
use deadbolt_proto::validate::field_violations;
use deadbolt_runtime::convert::{spec_from_submit, spec_to_proto};
use pb::submit_experiment_request::Spec;
use proptest::prelude::*;

const BASE: &str = r#"name = "fuzz"
seed = 7

[dataset]
kind = "mnist"
path = "mnist"
validation_fraction = 0.2
train_limit = 1200
test_limit = 300

[model]
arch = "badnet-cnn"

[attack]
target = 0
rate = 0.1
seed = 1

[attack.trigger]
kind = "patch"
size = 3

[training]
lr = 0.05
schedule = "constant"
epochs = 1
batch_size = 64
device = "cpu"

[defense]
criteria = ["linf", "l1", "fine-pruning"]
stats_images = 120

[defense.synthetic]
steps = 10
images = 32
"#;

const HOSTILE: &[&str] = &[
    "-3",
    "0",
    "-1.5",
    "1e309",
    "nan",
    "inf",
    "99999999999999999999",
    "\"\"",
    "\"../../etc/passwd\"",
    "\"x\"",
    "true",
    "[1, 2]",
    "{ a = 1 }",
    "[]",
    "\"linf\"",
    "1.5",
    "-9223372036854775808",
];

fn check(result: Result<deadbolt_spec::ExperimentSpec, tonic::Status>, what: &str) {
    if let Err(s) = result {
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {s:?}");
        let fields = field_violations(&s);
        assert!(!fields.is_empty(), "{what}: no field named: {s:?}");
        for (f, _) in fields {
            assert!(f == "spec" || f.starts_with("spec."), "{what}: {f}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A value replaced by a hostile one, a line dropped or doubled, or a
    /// junk line inserted.
    #[test]
    fn mutated_toml_is_accepted_or_names_a_field(
        line in 0usize..40,
        op in 0u8..4,
        value in proptest::sample::select(HOSTILE),
        junk in "[a-z_]{1,12} = [-0-9a-z\"\\[\\]]{0,10}",
    ) {
        let mut lines: Vec<String> = BASE.lines().map(String::from).collect();
        let i = line % lines.len();
        match op {
            0 => {
                if let Some((k, _)) = lines[i].clone().split_once('=') {
                    lines[i] = format!("{k}= {value}");
                }
            }
            1 => {
                lines.remove(i);
            }
            2 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            _ => lines.insert(i, junk),
        }
        let text = lines.join("\n");
        check(spec_from_submit(Some(&Spec::SpecToml(text.clone()))), &text);
    }

    /// Arbitrary bytes as TOML.
    #[test]
    fn random_text_never_panics(text in "\\PC{0,200}") {
        check(spec_from_submit(Some(&Spec::SpecToml(text.clone()))), &text);
    }

    /// Structured specs with arbitrary numbers and enum values.
    #[test]
    fn random_proto_values_are_accepted_or_name_a_field(
        rate in proptest::num::f64::ANY,
        target in any::<i64>(),
        size in any::<i64>(),
        epochs in any::<u32>(),
        batch in any::<u32>(),
        lr in proptest::num::f64::ANY,
        criterion in any::<i32>(),
        arch in any::<i32>(),
        fraction in proptest::num::f64::ANY,
    ) {
        let base = deadbolt_spec::ExperimentSpec::from_toml_str(BASE).unwrap();
        let mut p = spec_to_proto(&base);
        if let Some(a) = p.attack.as_mut() {
            a.rate = rate;
            a.target = target;
            if let Some(pb::attack_spec::Trigger::Patch(t)) = a.trigger.as_mut() {
                t.size = size;
            }
        }
        if let Some(t) = p.training.as_mut() {
            t.epochs = Some(epochs);
            t.batch_size = Some(batch);
            t.lr = Some(lr);
        }
        if let Some(d) = p.defense.as_mut() {
            d.criteria.push(criterion);
        }
        if let Some(m) = p.model.as_mut() {
            m.arch = arch;
        }
        if let Some(d) = p.dataset.as_mut() {
            d.validation_fraction = Some(fraction);
        }
        check(spec_from_submit(Some(&Spec::Structured(p))), "proto");
    }
}
