//! Poisoning recipes: which training images get the trigger and which label
//! they get, deterministically from the recipe's seed. Dirty-label attacks
//! (patch, blend, WaNet) poison images of the other classes and relabel
//! them; the clean-label SIG poisons target-class images and keeps their
//! labels. WaNet's noise mode also warps `cross_ratio` times as many other
//! images with the field plus noise, keeping their labels.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::spec::{AttackSpec, TargetMode, TriggerSpec};
use crate::trigger::AttackTrigger;

/// Mixed into the recipe's seed for WaNet's noise-mode samples and noise.
const NOISE_SEED: u64 = 0x006e_6f69_7365;

/// An attack bound to a data shape: recipe plus the concrete trigger.
#[derive(Debug, Clone)]
pub struct Attack {
    pub spec: AttackSpec,
    pub trigger: AttackTrigger,
    pub classes: i64,
}

/// A poisoned training set that knows which samples were poisoned.
#[derive(Debug, Clone)]
pub struct PoisonedDataset {
    pub data: Dataset,
    /// Sorted indices of the poisoned samples (the ones carrying the
    /// trigger; WaNet's noise-mode images are not among them).
    pub poisoned: Vec<i64>,
}

/// Triggered evaluation inputs: the images that count for ASR/RA.
#[derive(Debug)]
pub struct TriggeredSet {
    pub images: Tensor,
    /// True labels.
    pub labels: Tensor,
    /// Labels the attacker wants.
    pub targets: Tensor,
}

impl Attack {
    /// Validates the recipe against the data and builds the trigger.
    pub fn new(spec: &AttackSpec, shape: (i64, i64, i64), classes: i64) -> Result<Attack> {
        spec.validate_for(shape.1, shape.2, classes)?;
        Ok(Attack {
            spec: spec.clone(),
            trigger: AttackTrigger::from_spec(&spec.trigger, shape)?,
            classes,
        })
    }

    /// For a dataset, the same attack (checked against its shape and classes).
    pub fn for_dataset(spec: &AttackSpec, ds: &Dataset) -> Result<Attack> {
        Attack::new(spec, ds.image_shape(), ds.classes)
    }

    /// The attacker's label for each true label.
    pub fn target_labels(&self, labels: &Tensor) -> Tensor {
        match self.spec.target_mode {
            TargetMode::AllToOne => labels.full_like(self.spec.target),
            TargetMode::AllToAll => (labels + 1).remainder(self.classes),
        }
    }

    /// Whether a sample of this label counts for ASR (for all-to-one, not
    /// of the target class).
    fn eligible(&self, label: i64) -> bool {
        match self.spec.target_mode {
            TargetMode::AllToOne => label != self.spec.target,
            TargetMode::AllToAll => true,
        }
    }

    /// Whether a training sample of this label can be poisoned: for a
    /// clean-label attack (SIG) only the target class, else as
    /// [`Attack::eligible`].
    fn poisonable(&self, label: i64) -> bool {
        if self.spec.trigger.clean_label() {
            label == self.spec.target
        } else {
            self.eligible(label)
        }
    }

    /// Sorted indices to poison: `round(rate * poisonable)` poisonable
    /// samples, chosen by a seeded shuffle. Same recipe, same indices.
    pub fn poison_indices(&self, labels: &[i64]) -> Vec<i64> {
        let mut eligible: Vec<i64> = labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| self.poisonable(l))
            .map(|(i, _)| i as i64)
            .collect();
        let n = (self.spec.rate * eligible.len() as f64).round() as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(self.spec.seed);
        eligible.shuffle(&mut rng);
        let mut chosen = eligible[..n.min(eligible.len())].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// WaNet's noise mode: sorted indices of `round(cross_ratio *
    /// poisoned.len())` samples of any class outside `poisoned` (a seeded
    /// shuffle, as many as there are); empty for other triggers.
    pub fn noise_indices(&self, labels: &[i64], poisoned: &[i64]) -> Vec<i64> {
        let TriggerSpec::Wanet { cross_ratio, .. } = self.spec.trigger else {
            return vec![];
        };
        let taken: std::collections::BTreeSet<i64> = poisoned.iter().copied().collect();
        let mut rest: Vec<i64> = (0..labels.len() as i64)
            .filter(|i| !taken.contains(i))
            .collect();
        let n = (cross_ratio * poisoned.len() as f64).round() as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(self.spec.seed ^ NOISE_SEED);
        rest.shuffle(&mut rng);
        let mut chosen = rest[..n.min(rest.len())].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// Stamps the trigger on the chosen samples and relabels them (a
    /// clean-label attack keeps their labels); WaNet's noise-mode samples
    /// get the field plus noise and keep their labels.
    pub fn poison(&self, ds: &Dataset) -> Result<PoisonedDataset> {
        if ds.image_shape() != self.shape() || ds.classes != self.classes {
            return Err(Error::Other(format!(
                "attack built for {:?} images and {} classes, dataset has {:?} and {}",
                self.shape(),
                self.classes,
                ds.image_shape(),
                ds.classes
            )));
        }
        let all_labels = ds.labels_vec();
        let idx = self.poison_indices(&all_labels);
        let mut images = ds.images.copy();
        let mut labels = ds.labels.copy();
        if !idx.is_empty() {
            let it = Tensor::from_slice(&idx).to_device(ds.images.device());
            let stamped = self.trigger.apply_poison(&images.index_select(0, &it));
            let _ = images.index_copy_(0, &it, &stamped);
            if !self.spec.trigger.clean_label() {
                let relabelled = self.target_labels(&labels.index_select(0, &it));
                let _ = labels.index_copy_(0, &it, &relabelled);
            }
        }
        let noise = self.noise_indices(&all_labels, &idx);
        if let (AttackTrigger::Warp(warp), false) = (&self.trigger, noise.is_empty()) {
            let it = Tensor::from_slice(&noise).to_device(ds.images.device());
            let warped =
                warp.apply_noisy(&images.index_select(0, &it), self.spec.seed ^ NOISE_SEED);
            let _ = images.index_copy_(0, &it, &warped);
        }
        Ok(PoisonedDataset {
            data: Dataset {
                images,
                labels,
                classes: ds.classes,
            },
            poisoned: idx,
        })
    }

    /// The triggered version of a (clean) evaluation set, keeping only the
    /// samples that count for ASR (for all-to-one, not of the target class).
    pub fn triggered(&self, ds: &Dataset) -> TriggeredSet {
        let keep: Vec<i64> = ds
            .labels_vec()
            .iter()
            .enumerate()
            .filter(|(_, &l)| self.eligible(l))
            .map(|(i, _)| i as i64)
            .collect();
        let it = Tensor::from_slice(&keep).to_device(ds.images.device());
        let labels = ds.labels.index_select(0, &it);
        TriggeredSet {
            images: self.trigger.apply(&ds.images.index_select(0, &it)),
            targets: self.target_labels(&labels),
            labels,
        }
    }

    pub fn shape(&self) -> (i64, i64, i64) {
        self.trigger.shape()
    }
}

impl TriggeredSet {
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// As a dataset labelled with the true labels.
    pub fn as_dataset(&self, classes: i64) -> Dataset {
        Dataset {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            classes,
        }
    }
}

#[cfg(test)]
impl Attack {
    /// The SIG signal (test or training amplitude) as a `[1, C, H, W]` batch.
    fn trigger_signal(&self, test: bool) -> Tensor {
        match &self.trigger {
            AttackTrigger::Signal(s) if test => s.test.unsqueeze(0),
            AttackTrigger::Signal(s) => s.train.unsqueeze(0),
            _ => panic!("not a signal"),
        }
    }
}

#[cfg(test)]
impl TriggeredSet {
    /// Whether no true label is `label`.
    fn labels_vec_ne(&self, label: i64) -> bool {
        self.labels.ne(label).all().int64_value(&[]) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{PatchPattern, PatchPosition, TriggerSpec};
    use tch::{Device, Kind};

    fn ds(n: i64) -> Dataset {
        let x = crate::rng::uniform(&[n, 1, 6, 6], 101) * 0.5;
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(4);
        Dataset::new(x, y, 4, "t").unwrap()
    }

    fn spec(mode: TargetMode, rate: f64, seed: u64) -> AttackSpec {
        AttackSpec {
            trigger: TriggerSpec::Patch {
                size: 2,
                position: PatchPosition::default(),
                pattern: PatchPattern::Solid,
                value: 1.0,
            },
            target_mode: mode,
            target: 1,
            rate,
            seed,
        }
    }

    #[test]
    fn all_to_one_is_deterministic_and_skips_target() {
        let d = ds(40);
        let a = Attack::for_dataset(&spec(TargetMode::AllToOne, 0.5, 9), &d).unwrap();
        let p1 = a.poison(&d).unwrap();
        let p2 = a.poison(&d).unwrap();
        assert_eq!(p1.poisoned, p2.poisoned);
        assert_eq!(p1.poisoned.len(), 15); // 30 eligible
        let labels = d.labels_vec();
        let new = p1.data.labels_vec();
        for (i, l) in labels.iter().enumerate() {
            let pois = p1.poisoned.contains(&(i as i64));
            assert!(!(pois && *l == 1), "target class poisoned");
            assert_eq!(new[i], if pois { 1 } else { *l });
        }
        // non-poisoned images untouched, poisoned ones stamped
        let clean: Vec<i64> = (0..40).filter(|i| !p1.poisoned.contains(i)).collect();
        let ci = Tensor::from_slice(&clean);
        assert!(p1
            .data
            .images
            .index_select(0, &ci)
            .equal(&d.images.index_select(0, &ci)));
        let pi = p1.poisoned[0];
        assert_eq!(p1.data.images.double_value(&[pi, 0, 5, 5]), 1.0);
        let other = Attack::for_dataset(&spec(TargetMode::AllToOne, 0.5, 10), &d).unwrap();
        assert_ne!(other.poison_indices(&labels), p1.poisoned);
    }

    #[test]
    fn all_to_all_shifts_labels() {
        let d = ds(8);
        let a = Attack::for_dataset(&spec(TargetMode::AllToAll, 1.0, 0), &d).unwrap();
        let p = a.poison(&d).unwrap();
        assert_eq!(p.poisoned.len(), 8);
        let want: Vec<i64> = d.labels_vec().iter().map(|l| (l + 1) % 4).collect();
        assert_eq!(p.data.labels_vec(), want);
        let t = a.triggered(&d);
        assert_eq!(t.len(), 8);
    }

    #[test]
    fn rate_zero_poisons_nothing_and_triggered_skips_target() {
        let d = ds(12);
        let a = Attack::for_dataset(&spec(TargetMode::AllToOne, 0.0, 0), &d).unwrap();
        assert!(a.poison(&d).unwrap().poisoned.is_empty());
        let t = a.triggered(&d);
        assert_eq!(t.len(), 9);
        assert_eq!(t.targets.max().int64_value(&[]), 1);
    }

    fn with_trigger(trigger: TriggerSpec, rate: f64, seed: u64) -> AttackSpec {
        AttackSpec {
            trigger,
            rate,
            seed,
            ..spec(TargetMode::AllToOne, rate, seed)
        }
    }

    fn sig(delta: f64, test_delta: Option<f64>) -> TriggerSpec {
        TriggerSpec::Sig {
            delta,
            test_delta,
            frequency: 2.0,
        }
    }

    fn wanet(cross_ratio: f64) -> TriggerSpec {
        TriggerSpec::Wanet {
            k: 2,
            s: 2.0,
            grid_rescale: 1.0,
            cross_ratio,
            seed: 5,
        }
    }

    fn rows(t: &Tensor, idx: &[i64]) -> Tensor {
        t.index_select(0, &Tensor::from_slice(idx))
    }

    fn others(n: i64, idx: &[i64]) -> Vec<i64> {
        (0..n).filter(|i| !idx.contains(i)).collect()
    }

    #[test]
    fn sig_poisons_only_the_target_class_and_keeps_labels() {
        let d = ds(40);
        let a = Attack::for_dataset(&with_trigger(sig(0.1, Some(0.2)), 0.5, 3), &d).unwrap();
        let p = a.poison(&d).unwrap();
        let labels = d.labels_vec();
        // 10 images of class 1 (the target); half of them poisoned
        assert_eq!(p.poisoned.len(), 5);
        assert!(p.poisoned.iter().all(|&i| labels[i as usize] == 1));
        assert_eq!(p.data.labels_vec(), labels, "clean-label: no label changes");
        // poisoned images carry the training signal, the rest are untouched
        let want = (rows(&d.images, &p.poisoned) + a.trigger_signal(false)).clamp(0.0, 1.0);
        assert!(rows(&p.data.images, &p.poisoned).allclose(&want, 1e-6, 1e-6, false));
        let rest = others(40, &p.poisoned);
        assert!(rows(&p.data.images, &rest).equal(&rows(&d.images, &rest)));
        assert!(p.data.images.min().double_value(&[]) >= 0.0);
        assert!(p.data.images.max().double_value(&[]) <= 1.0);
        // same recipe, same images; another seed, others
        assert_eq!(a.poison(&d).unwrap().poisoned, p.poisoned);
        let b = Attack::for_dataset(&with_trigger(sig(0.1, None), 0.5, 4), &d).unwrap();
        assert_ne!(b.poison_indices(&labels), p.poisoned);
        // test time: the other classes, the test amplitude, target labels
        let t = a.triggered(&d);
        assert_eq!(t.len(), 30);
        assert!(t.labels_vec_ne(1));
        assert_eq!(t.targets.min().int64_value(&[]), 1);
        assert_eq!(t.targets.max().int64_value(&[]), 1);
        let keep: Vec<i64> = (0..40).filter(|&i| labels[i as usize] != 1).collect();
        let want = (rows(&d.images, &keep) + a.trigger_signal(true)).clamp(0.0, 1.0);
        assert!(t.images.allclose(&want, 1e-6, 1e-6, false));
    }

    #[test]
    fn wanet_warps_poisoned_images_and_noise_mode_keeps_labels() {
        let d = ds(40);
        let a = Attack::for_dataset(&with_trigger(wanet(2.0), 0.2, 9), &d).unwrap();
        let p = a.poison(&d).unwrap();
        let labels = d.labels_vec();
        assert_eq!(p.poisoned.len(), 6); // 30 eligible
        let noise = a.noise_indices(&labels, &p.poisoned);
        assert_eq!(noise.len(), 12);
        assert!(noise.iter().all(|i| !p.poisoned.contains(i)));
        let new = p.data.labels_vec();
        for i in 0..40usize {
            let want = if p.poisoned.contains(&(i as i64)) {
                1
            } else {
                labels[i]
            };
            assert_eq!(new[i], want, "label of {i}");
        }
        let AttackTrigger::Warp(w) = &a.trigger else {
            panic!("not a warp")
        };
        assert!(rows(&p.data.images, &p.poisoned).allclose(
            &w.apply(&rows(&d.images, &p.poisoned)),
            1e-6,
            1e-6,
            false
        ));
        // noise-mode images differ from the clean and from the exact warp
        let (pn, dn) = (rows(&p.data.images, &noise), rows(&d.images, &noise));
        assert!(!pn.allclose(&dn, 1e-4, 1e-4, false));
        assert!(!pn.allclose(&w.apply(&dn), 1e-4, 1e-4, false));
        let mut touched = [p.poisoned.clone(), noise.clone()].concat();
        touched.sort_unstable();
        let rest = others(40, &touched);
        assert!(rows(&p.data.images, &rest).equal(&rows(&d.images, &rest)));
        assert!(p.data.images.min().double_value(&[]) >= 0.0);
        assert!(p.data.images.max().double_value(&[]) <= 1.0);
        // deterministic; cross_ratio 0 turns the noise mode off
        assert!(a.poison(&d).unwrap().data.images.equal(&p.data.images));
        let off = Attack::for_dataset(&with_trigger(wanet(0.0), 0.2, 9), &d).unwrap();
        assert!(off.noise_indices(&labels, &p.poisoned).is_empty());
        // all-to-all: every class, label + 1
        let mut s = with_trigger(wanet(1.0), 0.5, 2);
        s.target_mode = TargetMode::AllToAll;
        let a = Attack::for_dataset(&s, &d).unwrap();
        let p = a.poison(&d).unwrap();
        assert_eq!(p.poisoned.len(), 20);
        let new = p.data.labels_vec();
        for &i in &p.poisoned {
            assert_eq!(new[i as usize], (labels[i as usize] + 1) % 4);
        }
        assert_eq!(a.triggered(&d).len(), 40);
    }

    #[test]
    fn invalid_recipes_are_rejected() {
        let d = ds(4);
        let e = Attack::for_dataset(&spec(TargetMode::AllToOne, 1.5, 0), &d).unwrap_err();
        assert!(e.to_string().contains("attack.rate"), "{e}");
        let mut s = spec(TargetMode::AllToOne, 0.1, 0);
        s.target = 7;
        let e = Attack::for_dataset(&s, &d).unwrap_err();
        assert!(e.to_string().contains("attack.target"), "{e}");
        let mut s = spec(TargetMode::AllToOne, 0.1, 0);
        s.trigger = TriggerSpec::Patch {
            size: 7,
            position: PatchPosition::default(),
            pattern: PatchPattern::Solid,
            value: 1.0,
        };
        let e = Attack::for_dataset(&s, &d).unwrap_err();
        assert!(e.to_string().contains("bigger than"), "{e}");
    }
}
