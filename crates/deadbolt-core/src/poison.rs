//! Poisoning recipes: which training images get the trigger and which label
//! they get, deterministically from the recipe's seed.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::spec::{AttackSpec, TargetMode};
use crate::trigger::Trigger;

/// An attack bound to a data shape: recipe plus the concrete trigger.
#[derive(Debug, Clone)]
pub struct Attack {
    pub spec: AttackSpec,
    pub trigger: Trigger,
    pub classes: i64,
}

/// A poisoned training set that knows which samples were poisoned.
#[derive(Debug, Clone)]
pub struct PoisonedDataset {
    pub data: Dataset,
    /// Sorted indices of the poisoned samples.
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
            trigger: Trigger::from_spec(&spec.trigger, shape)?,
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

    /// Whether a sample of this label can be poisoned / counts for ASR.
    fn eligible(&self, label: i64) -> bool {
        match self.spec.target_mode {
            TargetMode::AllToOne => label != self.spec.target,
            TargetMode::AllToAll => true,
        }
    }

    /// Sorted indices to poison: `round(rate * eligible)` eligible samples,
    /// chosen by a seeded shuffle. Same recipe, same indices.
    pub fn poison_indices(&self, labels: &[i64]) -> Vec<i64> {
        let mut eligible: Vec<i64> = labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| self.eligible(l))
            .map(|(i, _)| i as i64)
            .collect();
        let n = (self.spec.rate * eligible.len() as f64).round() as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(self.spec.seed);
        eligible.shuffle(&mut rng);
        let mut chosen = eligible[..n.min(eligible.len())].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// Stamps the trigger on the chosen samples and relabels them.
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
        let idx = self.poison_indices(&ds.labels_vec());
        let mut images = ds.images.copy();
        let mut labels = ds.labels.copy();
        if !idx.is_empty() {
            let it = Tensor::from_slice(&idx).to_device(ds.images.device());
            let stamped = self.trigger.apply(&images.index_select(0, &it));
            let relabelled = self.target_labels(&labels.index_select(0, &it));
            let _ = images.index_copy_(0, &it, &stamped);
            let _ = labels.index_copy_(0, &it, &relabelled);
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
        let p = self.trigger.pattern.size();
        (p[0], p[1], p[2])
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
