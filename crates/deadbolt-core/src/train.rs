//! Training: SGD with momentum or Adam, weight decay, constant / cosine / step
//! learning rate, seeded batch order, a callback after every epoch (for
//! checkpoints) and resumption from a completed epoch.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::mpsc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::optim::Optimizer;
use crate::progress::Progress;
use crate::spec::{Schedule, TrainingSpec};

/// What an epoch reports (defined beside [`Progress`], which observes it).
pub use crate::progress::EpochReport;

/// CPU time of this process so far (all threads, user + system), seconds.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// Learning rate for a 0-based epoch.
pub fn lr_at(spec: &TrainingSpec, epoch: usize) -> f64 {
    match spec.schedule {
        Schedule::Constant => spec.lr,
        Schedule::Cosine => {
            spec.lr * 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / spec.epochs as f64).cos())
        }
        Schedule::Step => spec.lr * spec.gamma.powi((epoch / spec.step_size.max(1)) as i32),
    }
}

/// The order of samples in a (0-based) epoch: a function of seed and epoch
/// only, so a resumed run sees the same batches.
pub fn epoch_order(n: i64, seed: u64, epoch: usize) -> Vec<i64> {
    let mut v: Vec<i64> = (0..n).collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    v.shuffle(&mut rng);
    v
}

/// Images gathered per copy of the training data into the batch buffer.
const GATHER_IMAGES: i64 = 4096;

/// Where a training run starts: after `epoch` completed epochs, with the
/// optimizer (and its state) to continue with, or a fresh one.
#[derive(Debug, Default)]
pub struct Start {
    pub epoch: usize,
    pub optimizer: Option<Optimizer>,
}

impl Start {
    /// Epoch 0, a fresh optimizer.
    pub fn fresh() -> Start {
        Start::default()
    }
}

/// Trains `model` on `data` for epochs `start.epoch..spec.epochs` (0-based;
/// `start.epoch` = epochs already completed). `on_epoch` runs after each
/// epoch with the model, the optimizer and the epoch's report (save a
/// checkpoint there: [`Optimizer::save`] for the optimizer's state). When
/// resuming, pass in `start` the optimizer with the state saved after
/// `start.epoch` ([`Optimizer::load`]) so the run continues exactly as if
/// uninterrupted; `None` starts a fresh one.
///
/// On the CPU with several libtorch threads (`spec.threads`, or libtorch's
/// default), a network whose images do not interact in training (no batch
/// norm: [`Model::batch_independent`]) gets each batch split over the
/// threads, one single-threaded forward and backward pass per part, whose
/// gradients are added in a fixed order; other networks and GPUs use
/// libtorch's own threads. The
/// same spec, seed and thread count give the same weights and figures, bit
/// for bit; another thread count gives the same training to float rounding.
pub fn train(
    model: &mut Model,
    data: &Dataset,
    spec: &TrainingSpec,
    seed: u64,
    start: Start,
    progress: &dyn Progress,
    mut on_epoch: impl FnMut(&Model, &Optimizer, &EpochReport) -> Result<()>,
) -> Result<Vec<EpochReport>> {
    if data.is_empty() {
        return Err(Error::EmptyDataset("training set".into()));
    }
    crate::device::set_threads(spec.threads);
    let dev = model.device();
    let data = data.to_device(dev);
    let n = data.len();
    let batch = spec.batch_size.max(1) as i64;
    let start_epoch = start.epoch;
    let mut opt = start
        .optimizer
        .unwrap_or_else(|| Optimizer::new(model, spec));
    // the epoch's images are gathered in order a chunk of whole batches at
    // a time into one reused buffer; a batch is then a view of it
    let chunk = batch * (GATHER_IMAGES / batch).max(1);
    let mut shape = data.images.size();
    shape[0] = chunk.min(n);
    let gathered = Tensor::empty(shape.as_slice(), (Kind::Float, dev));
    let n_batches = (n + batch - 1) / batch;
    let batch_sizes = Tensor::from_slice(
        &(0..n_batches)
            .map(|b| batch.min(n - b * batch) as f64)
            .collect::<Vec<_>>(),
    )
    .to_device(dev);
    let threads = tch::get_num_threads().max(1) as usize;
    let split = dev == Device::Cpu && threads > 1 && batch > 1 && model.batch_independent();
    let _one = split.then(OneThread::here);
    std::thread::scope(|scope| -> Result<Vec<EpochReport>> {
        let mut backprop = if split {
            Backprop::split(scope, model, threads.min(batch as usize))?
        } else {
            Backprop::Whole
        };
        let mut reports = Vec::new();
        for epoch in start_epoch..spec.epochs {
            let lr = lr_at(spec, epoch);
            let order = Tensor::from_slice(&epoch_order(n, seed, epoch)).to_device(dev);
            let labels = data.labels.index_select(0, &order);
            // per batch: its mean loss; per image: the predicted label
            let losses = Tensor::empty([n_batches], (Kind::Float, dev));
            let predicted = Tensor::empty([n], (Kind::Int64, dev));
            progress.start(&format!("epoch {}/{}", epoch + 1, spec.epochs), n as u64);
            let t0 = Instant::now();
            let cpu0 = process_cpu_seconds();
            let (mut s, mut b) = (0, 0);
            while s < n {
                let chunk_len = chunk.min(n - s);
                let images = gathered.narrow(0, 0, chunk_len);
                let _ =
                    data.images
                        .f_index_select_out(&images, 0, &order.narrow(0, s, chunk_len))?;
                let mut c = 0;
                while c < chunk_len {
                    if progress.cancelled() {
                        return Err(Error::Cancelled);
                    }
                    let len = batch.min(chunk_len - c);
                    opt.zero_grad();
                    let loss = backprop.run(
                        model,
                        &images.narrow(0, c, len),
                        &labels.narrow(0, s + c, len),
                        &predicted.narrow(0, s + c, len),
                    )?;
                    opt.step(lr)?;
                    tch::no_grad(|| losses.get(b).f_copy_(&loss))?;
                    c += len;
                    b += 1;
                    progress.inc(len as u64);
                }
                s += chunk_len;
            }
            // reading the figures waits for the device, so the time is honest
            let loss_sum = (losses.to_kind(Kind::Double) * &batch_sizes)
                .sum(Kind::Double)
                .double_value(&[]);
            let correct = predicted
                .eq_tensor(&labels)
                .sum(Kind::Int64)
                .int64_value(&[]);
            let seconds = t0.elapsed().as_secs_f64();
            let report = EpochReport {
                epoch: epoch + 1,
                loss: loss_sum / n as f64,
                train_acc: correct as f64 / n as f64,
                lr,
                seconds,
                images_per_sec: n as f64 / seconds,
                cpu_seconds: process_cpu_seconds() - cpu0,
            };
            if !report.loss.is_finite() {
                return Err(Error::Other(format!(
                    "training diverged at epoch {} (loss {}); lower training.lr",
                    epoch + 1,
                    report.loss
                )));
            }
            progress.finish(&format!(
                "epoch {} loss {:.4} acc {:.4}",
                report.epoch, report.loss, report.train_acc
            ));
            tracing::info!(
                epoch = report.epoch,
                loss = report.loss,
                train_acc = report.train_acc,
                lr,
                images_per_sec = report.images_per_sec,
                "epoch done"
            );
            on_epoch(model, &opt, &report)?;
            progress.epoch_saved(&report);
            reports.push(report);
        }
        Ok(reports)
    })
}

/// libtorch on one core for the calling thread only, while work is split
/// over threads that each run their part single-threaded; restored when
/// dropped. OpenMP's thread count is per thread; MKL's is set per thread
/// (`mkl_set_num_threads_local`), so nothing process-wide changes and
/// other threads' work (another job, another test) is not disturbed.
/// Where libtorch's MKL lacks that call, libtorch's process-wide count is
/// set instead.
pub(crate) struct OneThread {
    restore: i32,
}

/// `omp_set_num_threads`.
type OmpSetThreads = unsafe extern "C" fn(libc::c_int);
/// MKL's `mkl_set_num_threads_local` (returns the previous local count).
type MklSetThreads = unsafe extern "C" fn(libc::c_int) -> libc::c_int;

/// `omp_set_num_threads` and `MKL_Set_Num_Threads_Local` from the loaded
/// libraries (libgomp and libtorch_cpu), when both are there.
fn thread_setters() -> Option<(OmpSetThreads, MklSetThreads)> {
    static SETTERS: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    let found = SETTERS.get_or_init(|| {
        // SAFETY: dlsym with NUL-terminated names in the global scope.
        let find =
            |name: &std::ffi::CStr| unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        let omp = find(c"omp_set_num_threads");
        // the C interface (`mkl_set_num_threads_local` is a macro for it;
        // the lowercase symbol is the Fortran one, which takes a pointer)
        let mkl = find(c"MKL_Set_Num_Threads_Local");
        (!omp.is_null() && !mkl.is_null()).then_some((omp as usize, mkl as usize))
    });
    // SAFETY: the symbols are these C functions (OpenMP and MKL APIs).
    found.map(|(omp, mkl)| unsafe {
        (
            std::mem::transmute::<usize, OmpSetThreads>(omp),
            std::mem::transmute::<usize, MklSetThreads>(mkl),
        )
    })
}

impl OneThread {
    pub(crate) fn here() -> OneThread {
        // also libtorch's lazy per-thread setup, which would otherwise run
        // later and undo what follows
        let restore = tch::get_num_threads();
        match thread_setters() {
            // SAFETY: plain C calls with an int argument.
            Some((omp, mkl)) => unsafe {
                omp(1);
                mkl(1);
            },
            None => tch::set_num_threads(1),
        }
        OneThread { restore }
    }
}

impl Drop for OneThread {
    fn drop(&mut self) {
        match thread_setters() {
            // SAFETY: as above; 0 makes MKL follow its process-wide count.
            Some((omp, mkl)) => unsafe {
                omp(self.restore);
                mkl(0);
            },
            None => tch::set_num_threads(self.restore),
        }
    }
}

/// How a batch's gradient is computed: on this thread with libtorch's own
/// threads, or split into one part per thread.
///
/// Split: on the CPU, for a network whose images do not interact in
/// training ([`Model::batch_independent`]), each of `T` threads runs the
/// forward and backward pass of a contiguous `1/T` of the batch with one
/// libtorch thread, and the parts' gradients are added in a fixed order
/// (this thread's first). The gradient is the batch mean's, as a whole
/// batch gives it, up to float rounding; the same thread count always
/// gives the same figures. Small ops parallelise poorly inside libtorch
/// (every op waits for both threads), whole passes on separate cores do.
enum Backprop {
    Whole,
    Split {
        /// This thread's handles of the trainable parameters, by name.
        params: Vec<Tensor>,
        workers: Vec<Worker>,
    },
}

/// A thread running parts of batches on a replica of the model.
struct Worker {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Result<PartDone>>,
}

/// A part of a batch: images, labels, the share of the batch it is (its
/// mean loss is weighted by it), and where its predictions go.
struct Job {
    x: Tensor,
    y: Tensor,
    share: f64,
    predicted: Tensor,
}

/// A part's gradients (in parameter order) and its weighted loss.
struct PartDone {
    grads: Vec<Tensor>,
    loss: Tensor,
}

/// The trainable parameters of a model in name order (the optimizer's).
fn trainable(model: &Model) -> Vec<Tensor> {
    let vars: std::collections::BTreeMap<String, Tensor> =
        model.vs.variables().into_iter().collect();
    vars.into_values().filter(Tensor::requires_grad).collect()
}

/// A model whose parameters share `model`'s storage (so they see its
/// updates) but are separate autograd leaves, with the same masks.
fn replica(model: &Model) -> Result<Model> {
    let mut r = Model::new(model.info.clone(), Device::Cpu)?;
    let src = model.vs.variables();
    tch::no_grad(|| {
        for (name, mut v) in r.vs.variables() {
            v.set_data(&src[&name].detach());
        }
    });
    for layer in model.prunable_layers() {
        if let Some(m) = model.mask(&layer.name) {
            r.set_mask(&layer.name, Some(m.shallow_clone()))?;
        }
    }
    Ok(r)
}

impl Backprop {
    /// `parts` threads: this one and `parts - 1` workers in `scope`.
    fn split<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        model: &Model,
        parts: usize,
    ) -> Result<Backprop> {
        let mut workers = Vec::new();
        for _ in 1..parts {
            let replica = replica(model)?;
            let (jobs, job_rx) = mpsc::channel::<Job>();
            let (done_tx, done) = mpsc::channel();
            scope.spawn(move || {
                let _one = OneThread::here();
                let params = trainable(&replica);
                for job in job_rx {
                    let out = (|| -> Result<PartDone> {
                        let logits = replica.forward_t(&job.x, true);
                        let loss = logits.cross_entropy_for_logits(&job.y) * job.share;
                        let grads = Tensor::f_run_backward(&[&loss], &params, false, false)?;
                        let _ = tch::no_grad(|| logits.f_argmax_out(&job.predicted, 1, false))?;
                        Ok(PartDone {
                            grads,
                            loss: loss.detach(),
                        })
                    })();
                    if done_tx.send(out).is_err() {
                        break;
                    }
                }
            });
            workers.push(Worker { jobs, done });
        }
        Ok(Backprop::Split {
            params: trainable(model),
            workers,
        })
    }

    /// Forward and backward pass of a batch: leaves the batch mean loss's
    /// gradient in the parameters' `.grad` (zeroed before), writes the
    /// predicted labels into `predicted` and returns the mean loss.
    fn run(&mut self, model: &Model, x: &Tensor, y: &Tensor, predicted: &Tensor) -> Result<Tensor> {
        let len = x.size()[0];
        let whole = |x: &Tensor, y: &Tensor, predicted: &Tensor, share: f64| -> Result<Tensor> {
            let logits = model.forward_t(x, true);
            let mean = logits.cross_entropy_for_logits(y);
            let loss = if share == 1.0 { mean } else { mean * share };
            loss.f_backward()?;
            let _ = tch::no_grad(|| logits.f_argmax_out(predicted, 1, false))?;
            Ok(loss.detach())
        };
        let (params, workers) = match self {
            Backprop::Split { params, workers } if len > workers.len() as i64 => (params, workers),
            _ => return whole(x, y, predicted, 1.0),
        };
        let parts = workers.len() as i64 + 1;
        let bound = |i: i64| i * len / parts;
        let piece = |t: &Tensor, i: i64| t.narrow(0, bound(i), bound(i + 1) - bound(i));
        let share = |i: i64| (bound(i + 1) - bound(i)) as f64 / len as f64;
        for (i, w) in (1..).zip(workers.iter()) {
            w.jobs
                .send(Job {
                    x: piece(x, i),
                    y: piece(y, i),
                    share: share(i),
                    predicted: piece(predicted, i),
                })
                .map_err(|_| Error::Other("a training thread stopped".into()))?;
        }
        let mut loss = whole(&piece(x, 0), &piece(y, 0), &piece(predicted, 0), share(0));
        // collect every part, even after an error, so no worker is left
        // holding this batch
        for w in workers.iter() {
            let part = w
                .done
                .recv()
                .map_err(|_| Error::Other("a training thread stopped".into()))
                .and_then(|r| r);
            loss = loss.and_then(|total| {
                let part = part?;
                tch::no_grad(|| -> Result<Tensor> {
                    for (p, g) in params.iter().zip(&part.grads) {
                        if g.defined() {
                            let _ = p.grad().f_add_(g)?;
                        }
                    }
                    Ok(total + part.loss)
                })
            });
        }
        loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use crate::spec::OptimizerKind;
    use tch::Device;

    /// Two classes: bright top half vs bright bottom half.
    pub(crate) fn toy(n: i64) -> Dataset {
        let x = crate::rng::uniform(&[n, 1, 16, 16], 101) * 0.3;
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(2);
        for i in 0..n {
            let half = if i % 2 == 0 { 0 } else { 8 };
            let _ = x.get(i).narrow(1, half, 8).g_add_scalar_(0.6);
        }
        Dataset::new(x, y, 2, "toy").unwrap()
    }

    fn spec(epochs: usize) -> TrainingSpec {
        TrainingSpec {
            epochs,
            batch_size: 16,
            lr: 0.05,
            ..Default::default()
        }
    }

    fn fresh() -> Model {
        crate::model::test_badnet(2, (16, 16), 3)
    }

    #[test]
    fn learns_a_toy_task_and_checkpoints_every_epoch() {
        let d = toy(128);
        let mut m = fresh();
        let mut seen = vec![];
        let r = train(
            &mut m,
            &d,
            &spec(3),
            0,
            Start::fresh(),
            &Silent,
            |_, _, e| {
                seen.push(e.epoch);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, [1, 2, 3]);
        assert!(r[2].train_acc > 0.9, "{r:?}");
        let acc = crate::eval::evaluate(&m, &d, None).unwrap().acc;
        assert!(acc > 0.9, "{acc}");
    }

    #[test]
    fn resume_matches_uninterrupted_weights() {
        // With the optimizer's state saved beside the epoch checkpoint,
        // resuming reproduces the uninterrupted run exactly, momentum and
        // Adam included.
        let d = toy(64);
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
            let mut s = spec(3);
            s.optimizer = kind;
            s.momentum = 0.9;
            if kind == OptimizerKind::Adam {
                s.lr = 1e-3;
            }
            let mut full = fresh();
            train(&mut full, &d, &s, 5, Start::fresh(), &Silent, |_, _, _| {
                Ok(())
            })
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("optimizer.safetensors");
            let mut part = fresh();
            // stop after the first epoch, with a checkpoint
            train(&mut part, &d, &s, 5, Start::fresh(), &Silent, |m, o, e| {
                let mut meta = crate::model::CheckpointMeta::new(&m.info);
                meta.epoch = e.epoch;
                o.save(&state, e.epoch)?;
                m.save(dir.path(), &meta)?;
                Err(Error::Cancelled)
            })
            .unwrap_err();
            let (mut resumed, meta) = Model::load(dir.path(), Device::Cpu).unwrap();
            assert_eq!(meta.epoch, 1);
            let mut opt = Optimizer::new(&resumed, &s);
            opt.load(&state, 1).unwrap();
            let start = Start {
                epoch: 1,
                optimizer: Some(opt),
            };
            train(&mut resumed, &d, &s, 5, start, &Silent, |_, _, _| Ok(())).unwrap();
            let (a, b) = (full.vs.variables(), resumed.vs.variables());
            for (k, t) in &a {
                assert!(t.equal(&b[k]), "{kind:?}: {k} differs after resuming");
            }
            // a state saved after another epoch is refused, naming the file
            let e = Optimizer::new(&fresh(), &s)
                .load(&state, 2)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("optimizer.safetensors") && e.contains("epoch 1"),
                "{e}"
            );
        }
    }

    #[test]
    fn schedules() {
        let mut s = spec(10);
        s.schedule = Schedule::Cosine;
        assert!((lr_at(&s, 0) - 0.05).abs() < 1e-12);
        assert!((lr_at(&s, 5) - 0.025).abs() < 1e-12);
        s.schedule = Schedule::Step;
        s.step_size = 4;
        s.gamma = 0.1;
        assert!((lr_at(&s, 4) - 0.005).abs() < 1e-12);
        assert_eq!(epoch_order(10, 1, 2), epoch_order(10, 1, 2));
        assert_ne!(epoch_order(10, 1, 2), epoch_order(10, 1, 3));
    }

    #[test]
    fn adam_and_empty_data() {
        let d = toy(32);
        let mut m = fresh();
        let mut s = spec(1);
        s.optimizer = OptimizerKind::Adam;
        s.lr = 1e-3;
        train(&mut m, &d, &s, 0, Start::fresh(), &Silent, |_, _, _| Ok(())).unwrap();
        let e = train(
            &mut m,
            &d.take(0).select_vec(&[]),
            &s,
            0,
            Start::fresh(),
            &Silent,
            |_, _, _| Ok(()),
        );
        assert!(e.is_err());
    }
}
