//! `synthesis`: fits a synthesizer on a dataset and samples a synthetic table of the same
//! shape, with a report of its quality and privacy.
//!
//! Pipeline: read (polars) → profile → seeded train/holdout split → fit (Gaussian copula, or a
//! TVAE or CTGAN with candle) → sample → fresh identifiers → evaluate → publish the synthetic
//! file and `report.json` as artifacts. Everything random comes from one seeded RNG, so a seed
//! gives the same output; without a seed the job id provides it, so a retry repeats the attempt.
//! The one exception is differential privacy's noise, seeded from the operating system once per
//! job and kept out of sight (`shared::noise_seeds`): a private job's runs differ, its retries
//! do not (a retry that fitted with other noise released the rows again), and the seed printed
//! in the report undoes nothing.

mod activation;
mod adam;
pub mod constraints;
pub mod copula;
pub mod ctgan;
pub mod dp;
mod encoding;
mod matmul;
pub mod metrics;
mod norm;
pub mod profile;
pub mod saved;
pub mod stats;
pub mod table;
pub mod tvae;
pub mod visual;
mod weights;

use async_trait::async_trait;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};
use shared::object_deletes::Owner;
use shared::{datasets, noise_seeds, usage::Meter, Cancelled, JobContext};
use std::{collections::HashSet, sync::Arc, time::Instant};

pub use contracts::synthesis::{
    ColumnSettings, OutputFormat, SynthesisOutput, SynthesisOutputs, SynthesisPayload, Synthesizer,
    DEFAULT_EPOCHS, MAX_EPOCHS, MAX_ROWS,
};
use contracts::Artifact;

use crate::{Handler, JobError, Services};
use copula::{ColumnSpec, Copula};
use dp::Noise;
use profile::{ColumnProfile, Role};
use table::{Column, Table, Values};

/// Runs a network's training or sampling with its matrix products on one thread. Its matrices
/// are small (batches of at most 500 rows, 256 units): splitting each product across cores
/// costs more in synchronisation than it gains (CTGAN, diamonds, 10 epochs, release: 63.6 s on
/// one thread, 84.8 s on two; SDV's took 88–94 s), and a worker's other jobs keep the other
/// cores.
fn on_one_thread<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
        Ok(pool) => pool.install(work),
        Err(_) => work(),
    }
}

/// What the pipeline tells its caller while it works.
pub trait Monitor: Sync {
    fn stage(&self, fraction: f32, message: &str);
    /// One training epoch done, with its mean loss.
    fn epoch(&self, epoch: usize, epochs: usize, loss: f64);
    /// One epoch of a GAN done, with its generator's and critic's mean losses; reported as
    /// `epoch` with the generator's loss unless a monitor says more.
    fn gan_epoch(&self, epoch: usize, epochs: usize, generator: f64, critic: f64) {
        let _ = critic;
        self.epoch(epoch, epochs, generator);
    }
    /// Err once the work should stop.
    fn checkpoint(&self) -> Result<(), Cancelled>;
    /// The bytes a network's training may hold (`CONVEYOR_MAX_IN_MEMORY_BYTES` in a job).
    fn memory_cap(&self) -> u64 {
        u64::MAX
    }
}

/// A monitor that reports nothing and never stops (benchmarks, tests).
pub struct Quiet;

impl Monitor for Quiet {
    fn stage(&self, _: f32, _: &str) {}
    fn epoch(&self, _: usize, _: usize, _: f64) {}
    fn checkpoint(&self) -> Result<(), Cancelled> {
        Ok(())
    }
}

/// A fitted synthesizer.
enum Model {
    Copula(Copula),
    Tvae(tvae::Tvae),
    Ctgan(ctgan::Ctgan),
}

/// A synthetic table with its report, and the model when the payload saves it.
pub struct Synthesis {
    pub table: Table,
    pub report: Value,
    pub model: Option<saved::ModelFile>,
}

/// Most columns one fit learns: the copula's correlation matrices grow as the square of the
/// columns and their decomposition as the cube (800 columns took half a minute), with no
/// checkpoint inside.
pub const MAX_LEARNED_COLUMNS: usize = 500;

/// Fits and samples as `payload` says, on an already read table. `holdout_fraction` 0 fits
/// on every row (benchmarks).
pub fn synthesize(
    input: &Table,
    payload: &SynthesisPayload,
    seed: u64,
    monitor: &dyn Monitor,
) -> Result<Synthesis, JobError> {
    synthesize_noised(input, payload, seed, Noise::from_os(), monitor)
}

/// [`synthesize`], a private fit's noise drawn from `noise`.
pub fn synthesize_noised(
    input: &Table,
    payload: &SynthesisPayload,
    seed: u64,
    noise: Noise,
    monitor: &dyn Monitor,
) -> Result<Synthesis, JobError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let private = payload.epsilon.is_some();
    // A private fit takes roles from the types alone: "unique on every row" is a fact of
    // the data that one row can change.
    let profiles = profile::profile(input, &payload.overrides(), !private);
    let roles: Vec<(String, Role)> = profiles.iter().map(|p| (p.name.clone(), p.role)).collect();
    use contracts::synthesis::Constraint;
    // A fixed combination is learned as one label: an identifier in it would have its real
    // values learned and copied into the output (roles are known only now, from the data).
    for rule in &payload.constraints {
        let Constraint::FixedCombinations { columns } = rule else {
            continue;
        };
        if let Some((name, role)) = roles
            .iter()
            .find(|(name, role)| columns.contains(name) && !role.is_learned())
        {
            let role = if *role == Role::Skip {
                "skipped"
            } else {
                "an identifier"
            };
            return Err(JobError::Permanent(format!(
                "constraints: a fixed combination names {name:?}, which is {role} (its values \
                 are never learned; in a combination they would be copied into the output): \
                 leave it out, or give it another type in \"columns\""
            )));
        }
    }
    let (train, holdout) = if payload.holdout_fraction > 0.0 {
        input.split(payload.holdout_fraction, &mut rng)
    } else {
        (input.clone(), Table::default())
    };
    // The model's view: each fixed combination is one joint label column.
    let model_train = constraints::combine(&train, &payload.constraints);
    let role_of = |name: &str| {
        profiles
            .iter()
            .find(|p| p.name == name)
            .map_or(Role::Categorical, |p| p.role)
    };
    let learned: Vec<(&Column, ColumnSpec)> = model_train
        .columns
        .iter()
        .filter(|column| role_of(&column.name).is_learned())
        .map(|column| {
            let settings = payload.columns.get(&column.name);
            let spec = ColumnSpec {
                role: role_of(&column.name),
                bounds: (settings.and_then(|s| s.min), settings.and_then(|s| s.max)),
                levels: settings.and_then(|s| s.values.clone()),
            };
            (column, spec)
        })
        .collect();
    if learned.is_empty() {
        return Err(JobError::Permanent(
            "nothing to learn: every column is an identifier or skipped".into(),
        ));
    }
    if learned.len() > MAX_LEARNED_COLUMNS {
        return Err(JobError::Permanent(format!(
            "the dataset has {} columns to learn; at most {MAX_LEARNED_COLUMNS} are (skip some \
             with \"columns\": {{\"name\": {{\"type\": \"skip\"}}}})",
            learned.len()
        )));
    }
    if train.rows() < 2 {
        return Err(JobError::Permanent(format!(
            "the dataset has {} row(s) to train on; at least 2 are needed",
            train.rows()
        )));
    }
    monitor.checkpoint()?;
    monitor.stage(0.1, "fitting");
    let rows = payload.rows as usize;
    let started = Instant::now();
    let names: Vec<String> = learned.iter().map(|(c, _)| c.name.clone()).collect();
    let model = match payload.synthesizer {
        Synthesizer::GaussianCopula => {
            let stop = || monitor.checkpoint().is_err();
            let privacy = payload.epsilon.map(|epsilon| (epsilon, noise));
            let fitted = Copula::fit_noised(&learned, privacy, &stop);
            Model::Copula(fitted.map_err(|why| match monitor.checkpoint() {
                Err(cancelled) => cancelled.into(),
                Ok(()) => JobError::Permanent(why),
            })?)
        }
        Synthesizer::Tvae => {
            let epochs = payload.epochs.unwrap_or(DEFAULT_EPOCHS) as usize;
            Model::Tvae(on_one_thread(|| {
                tvae::Tvae::fit(&learned, epochs, rng.random(), monitor)
            })?)
        }
        Synthesizer::Ctgan => {
            let epochs = payload.epochs.unwrap_or(DEFAULT_EPOCHS) as usize;
            Model::Ctgan(on_one_thread(|| {
                ctgan::Ctgan::fit(&learned, epochs, rng.random(), monitor)
            })?)
        }
    };
    monitor.checkpoint()?;
    monitor.stage(0.6, "sampling");
    // Samples stay within each numeric column's training range (private fits excepted: the
    // range is a fact of the data they may not use).
    let ranges: Vec<Option<(f64, f64)>> = learned
        .iter()
        .map(|(column, spec)| {
            (!private && spec.role != Role::Categorical)
                .then(|| range(&column.values))
                .flatten()
        })
        .collect();
    let draw = |n: usize| -> Result<constraints::Columns, JobError> {
        let mut sampled = match &model {
            Model::Copula(copula) => copula.sample(n, &mut rng),
            Model::Tvae(tvae) => on_one_thread(|| tvae.sample(n, rng.random()))?,
            Model::Ctgan(ctgan) => on_one_thread(|| ctgan.sample(n, rng.random()))?,
        };
        for (values, range) in sampled.iter_mut().zip(&ranges) {
            if let Some(range) = range {
                clamp(values, *range);
            }
        }
        Ok(constraints::separate(
            names.clone(),
            sampled,
            &payload.constraints,
            &train,
        ))
    };
    let (sampled, unconstrained) = constraints::sample_kept(rows, &payload.constraints, draw)?;
    let budget = match &model {
        Model::Copula(copula) => copula.budget.clone(),
        Model::Tvae(_) | Model::Ctgan(_) => None,
    };
    let saved = payload.save_model.then(|| {
        let fitted = match model {
            Model::Copula(copula) => saved::Fitted::Copula {
                marginals: copula.marginals,
                correlation: copula.correlation,
            },
            Model::Ctgan(ctgan) => saved::Fitted::Network {
                network: saved::Network::Ctgan(ctgan),
                ranges,
            },
            Model::Tvae(tvae) => saved::Fitted::Network {
                network: saved::Network::Tvae(tvae),
                ranges,
            },
        };
        saved::ModelFile::new(
            input,
            &profiles,
            names.clone(),
            fitted,
            &payload.constraints,
            budget.as_ref().map(|b| b.epsilon),
        )
    });
    let fit_and_sample = started.elapsed();

    // Output columns in input order: learned ones from the model, fresh identifiers, no skips.
    let assemble = |mut sampled: constraints::Columns| {
        let mut columns = Vec::new();
        for (column, p) in input.columns.iter().zip(&profiles) {
            let learned = sampled.iter().position(|(name, _)| *name == column.name);
            let values = match (p.role, learned) {
                (Role::Skip, _) => continue,
                (_, Some(at)) => sampled.swap_remove(at).1,
                _ => fresh_identifiers(&column.values, rows, private),
            };
            columns.push(Column {
                values,
                ..column.clone()
            });
        }
        Table { columns }
    };
    let synthetic = assemble(sampled);
    let stop = || monitor.checkpoint().is_err();
    let without_constraints = match payload.constraints.is_empty() {
        true => None,
        false => Some(
            metrics::quality(&train, &assemble(unconstrained), &roles, &stop).ok_or(Cancelled)?,
        ),
    };

    monitor.checkpoint()?;
    monitor.stage(0.9, "evaluating");
    let evaluated = Instant::now();
    let quality = metrics::quality(&train, &synthetic, &roles, &stop).ok_or(Cancelled)?;
    let privacy = metrics::privacy(
        &train,
        &holdout,
        &synthetic,
        &roles,
        budget.as_ref().map(|b| b.epsilon),
        &mut rng,
    );
    let report = json!({
        "synthesizer": payload.synthesizer,
        "seed": seed,
        "rows": {
            "input": input.rows(),
            "train": train.rows(),
            "holdout": holdout.rows(),
            "generated": rows,
        },
        "columns": profiles.iter().map(column_report).collect::<Vec<_>>(),
        "distributions": visual::distributions(&train, &synthetic, &roles),
        "quality": quality,
        "quality_without_constraints": without_constraints,
        "constraints": payload.constraints,
        "privacy": {
            "dcr_synthetic_to_train": privacy.dcr_synthetic_to_train,
            "dcr_holdout_to_train": privacy.dcr_holdout_to_train,
            "exact_match_rate": privacy.exact_match_rate,
            "membership_inference": privacy.membership_inference,
            "epsilon_spent": privacy.epsilon_spent,
            "budget": budget,
        },
        "timings_ms": {
            "fit_and_sample": fit_and_sample.as_secs_f64() * 1e3,
            "evaluate": evaluated.elapsed().as_secs_f64() * 1e3,
        },
    });
    Ok(Synthesis {
        table: synthetic,
        report,
        model: saved,
    })
}

/// What a synthetic row of `input`'s columns takes in memory: in each column of labels the
/// longest it may draw, learned or declared in `payload`.
fn output_row_bytes(input: &Table, payload: &SynthesisPayload) -> u64 {
    let longest = input.columns.iter().map(|column| {
        let declared = payload
            .columns
            .get(&column.name)
            .and_then(|c| c.values.as_ref());
        let declared = declared.into_iter().flatten().map(|v| v.len() as u64).max();
        column.values.longest_label().max(declared.unwrap_or(0))
    });
    contracts::synthesis::row_bytes(input.columns.len(), longest)
}

fn column_report(p: &ColumnProfile) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// Keeps a synthetic numeric column within the training column's range, as SDV's
/// `enforce_min_max_values` does, without planting the real extremes in the output. Private
/// fits skip this: the range itself would leak.
fn range(real: &Values) -> Option<(f64, f64)> {
    let Values::Numbers(real) = real else {
        return None;
    };
    let present = real.iter().flatten();
    let lo = present.clone().fold(f64::INFINITY, |a, &b| a.min(b));
    let hi = present.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    (lo <= hi).then_some((lo, hi))
}

fn clamp(synthetic: &mut Values, (lo, hi): (f64, f64)) {
    if let Values::Numbers(synthetic) = synthetic {
        for v in synthetic.iter_mut().flatten() {
            *v = v.clamp(lo, hi);
        }
    }
}

/// Values that identify rows but were never seen: integers count on from the largest one,
/// text gets `syn-<n>` labels that no input value equals. Private fits look at nothing:
/// integers count from 1 and labels are `syn-<n>` as they come.
fn fresh_identifiers(original: &Values, rows: usize, private: bool) -> Values {
    match original {
        Values::Numbers(values) => {
            let largest = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
            let start = if private { 1.0 } else { largest.floor() + 1.0 };
            if start + rows as f64 <= EXACT_INTEGERS {
                return Values::Numbers((0..rows).map(|i| Some(start + i as f64)).collect());
            }
            // Past 2^53 floats cannot count by one (every other identifier repeated), and the
            // input was rounded when read, by less than the spacing of floats there: count
            // exactly from past that, as text the output casts to the column's type.
            // Checked: a float past i128 (1e39) saturates the cast, and adding overflowed
            // (a panic, or wrapped to negative identifiers).
            let start = (largest as i128)
                .checked_add((largest * f64::EPSILON).ceil() as i128 + 1)
                .filter(|start| {
                    start
                        .checked_add(rows as i128)
                        .is_some_and(|end| end <= i128::from(i64::MAX))
                });
            if let Some(start) = start {
                return Values::Labels(
                    (0..rows)
                        .map(|i| Some((start + i as i128).to_string()))
                        .collect(),
                );
            }
            // Past the largest 64-bit integer (an input of i64::MAX): no column holds those,
            // and the cast failed every attempt after the whole fit. Count from 1 instead,
            // skipping the inputs (exact there).
            let taken: HashSet<u64> = values.iter().flatten().map(|v| v.to_bits()).collect();
            let mut next = 0.0f64;
            let mut fresh = Vec::with_capacity(rows);
            while fresh.len() < rows {
                next += 1.0;
                if !taken.contains(&next.to_bits()) {
                    fresh.push(Some(next));
                }
            }
            Values::Numbers(fresh)
        }
        Values::Labels(values) => {
            let taken: HashSet<&str> = match private {
                true => HashSet::new(),
                false => values.iter().flatten().map(String::as_str).collect(),
            };
            let mut next = 0usize;
            let mut fresh = Vec::with_capacity(rows);
            while fresh.len() < rows {
                next += 1;
                let candidate = format!("syn-{next}");
                if !taken.contains(candidate.as_str()) {
                    fresh.push(Some(candidate));
                }
            }
            Values::Labels(fresh)
        }
    }
}

/// Below this, a float holds every whole number exactly (2^53).
const EXACT_INTEGERS: f64 = 9_007_199_254_740_992.0;

/// The `synthesis` job kind.
pub struct SynthesisHandler {
    services: Arc<Services>,
}

impl SynthesisHandler {
    pub fn new(services: Arc<Services>) -> Self {
        Self { services }
    }
}

/// What the pipeline, on a blocking thread, has to say; the job's task relays it.
pub(crate) enum Note {
    Stage(f32, String),
    Epoch {
        epoch: usize,
        epochs: usize,
        loss: f64,
        /// A GAN's critic loss (`loss` is then its generator's).
        critic: Option<f64>,
    },
}

/// The pipeline's side of the relay: sends notes, reads the cancellation flag directly.
pub(crate) struct JobMonitor {
    ctx: JobContext,
    notes: tokio::sync::mpsc::UnboundedSender<Note>,
    memory_cap: u64,
}

impl JobMonitor {
    /// A monitor for work on a blocking thread, and the inbox the job's task relays from
    /// (with [`relay`]) until the monitor is dropped.
    pub(crate) fn new(
        ctx: &JobContext,
        memory_cap: u64,
    ) -> (Self, tokio::sync::mpsc::UnboundedReceiver<Note>) {
        let (notes, inbox) = tokio::sync::mpsc::unbounded_channel();
        let ctx = ctx.clone();
        (
            Self {
                ctx,
                notes,
                memory_cap,
            },
            inbox,
        )
    }
}

impl Monitor for JobMonitor {
    fn memory_cap(&self) -> u64 {
        self.memory_cap
    }

    fn stage(&self, fraction: f32, message: &str) {
        let _ = self.notes.send(Note::Stage(fraction, message.to_owned()));
    }

    fn epoch(&self, epoch: usize, epochs: usize, loss: f64) {
        let _ = self.notes.send(Note::Epoch {
            epoch,
            epochs,
            loss,
            critic: None,
        });
    }

    fn gan_epoch(&self, epoch: usize, epochs: usize, generator: f64, critic: f64) {
        let _ = self.notes.send(Note::Epoch {
            epoch,
            epochs,
            loss: generator,
            critic: Some(critic),
        });
    }

    fn checkpoint(&self) -> Result<(), Cancelled> {
        self.ctx.checkpoint()
    }
}

pub(crate) async fn relay(ctx: &JobContext, note: Note) {
    match note {
        Note::Stage(fraction, message) => ctx.progress(fraction, message).await,
        Note::Epoch {
            epoch,
            epochs,
            loss,
            critic,
        } => {
            let message = format!("epoch {epoch}/{epochs}");
            let mut data = json!({"epoch": epoch, "epochs": epochs, "loss": loss});
            if let Some(critic) = critic {
                data["generator_loss"] = json!(loss);
                data["critic_loss"] = json!(critic);
            }
            ctx.report(message.clone(), data).await;
            // Training is 10 %–80 % of the job.
            let fraction = 0.1 + 0.7 * epoch as f32 / epochs as f32;
            ctx.progress(fraction, message).await;
        }
    }
}

#[async_trait]
impl Handler for SynthesisHandler {
    type Contract = contracts::synthesis::Synthesis;

    async fn run(
        &self,
        ctx: &JobContext,
        payload: SynthesisPayload,
    ) -> Result<SynthesisOutput, JobError> {
        let objects = &self.services.objects;
        let dataset = datasets::get(&self.services.pool, ctx.tenant_id(), payload.dataset_id)
            .await
            .map_err(|e| JobError::Retryable(format!("reading the dataset's record: {e}")))?
            .ok_or_else(|| JobError::Permanent("the dataset no longer exists".into()))?;
        let path = objects
            .dataset_file(&dataset)
            .await
            .map_err(|e| JobError::Retryable(format!("fetching the dataset: {e}")))?;
        let seed = payload.seed.unwrap_or_else(|| ctx.job_id().as_u64_pair().1);
        let noise = match payload.epsilon {
            Some(_) => self.noise(ctx, &dataset.sha256).await?,
            None => Noise::from_os(),
        };
        // Removed when dropped, whichever way the attempt ends (moved away when published).
        let output = objects
            .scratch_file()
            .await
            .map_err(|e| JobError::Retryable(format!("scratch space: {e}")))?;
        ctx.progress(0.0, "reading the dataset".to_owned()).await;

        let (monitor, mut inbox) = JobMonitor::new(ctx, self.services.limits.in_memory);
        let parquet = payload.output_format == OutputFormat::Parquet;
        let scratch = output.to_path_buf();
        let model_name = payload
            .model_name
            .clone()
            .unwrap_or_else(|| dataset.name.clone());
        let limits = self.services.limits;
        let cap = limits.held();
        let meter = ctx.meter().clone();
        Meter::add(&meter.bytes_read, dataset.size_bytes);
        let work = tokio::task::spawn_blocking(move || {
            meter.timed(|| -> Result<(Value, Option<saved::ModelFile>), JobError> {
                let input = table::read(&path, dataset.format, dataset.compression, cap)
                    .map_err(|e| JobError::Permanent(format!("reading the dataset: {e}")))?;
                Meter::add(&meter.rows_read, input.rows() as i64);
                limits.output(payload.rows as u64, output_row_bytes(&input, &payload))?;
                let synthesis = synthesize_noised(&input, &payload, seed, noise, &monitor)?;
                monitor.stage(0.95, "writing");
                table::write(&synthesis.table, &scratch, parquet).map_err(|e| {
                    JobError::Retryable(format!("writing the synthetic table: {e}"))
                })?;
                Meter::add(&meter.synthetic_rows, synthesis.table.rows() as i64);
                Ok((synthesis.report, synthesis.model))
            })
        });
        // The channel closes when the pipeline is done and drops its monitor.
        while let Some(note) = inbox.recv().await {
            relay(ctx, note).await;
        }
        let (report, model) = match work.await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                return Err(e);
            }
            Err(e) => {
                return Err(JobError::crashed(e));
            }
        };

        // Publishing replaces files of the same name, so a retried attempt leaves one copy.
        let name = if parquet {
            "synthetic.parquet"
        } else {
            "synthetic.csv"
        };
        let _publishing = ctx.committing().await?;
        let dataset_id = register_dataset(&self.services, ctx, &output, name, parquet).await?;
        let model_id = match model {
            Some(model) => Some(self.save_model(ctx, &model, model_name, &report).await?),
            None => None,
        };
        let size = objects
            .put_artifact_file(&output, ctx.job_id(), name)
            .await
            .map_err(|e| JobError::Retryable(format!("publishing {name}: {e}")))?;
        let report_bytes = serde_json::to_vec_pretty(&report).expect("report serializes");
        let report_size = objects
            .put_artifact(ctx.job_id(), "report.json", &report_bytes)
            .await
            .map_err(|e| JobError::Retryable(format!("publishing report.json: {e}")))?;
        let page = visual::html(&report);
        let page_size = objects
            .put_artifact(ctx.job_id(), "report.html", page.as_bytes())
            .await
            .map_err(|e| JobError::Retryable(format!("publishing report.html: {e}")))?;
        let artifact = |name: &str, size: u64| Artifact::of_job(ctx.job_id(), name, size);
        ctx.progress(1.0, "done".to_owned()).await;
        Ok(SynthesisOutput {
            artifacts: vec![
                artifact(name, size),
                artifact("report.json", report_size),
                artifact("report.html", page_size),
            ],
            outputs: SynthesisOutputs {
                dataset_id,
                model_id,
            },
            report,
        })
    }
}

impl SynthesisHandler {
    /// The noise of this job's private fit over the rows hashing to `rows_sha256`: the seed
    /// of the job's first attempt, so that a retry (after publishing, or by hand) releases
    /// the same values rather than the same rows with other noise.
    async fn noise(&self, ctx: &JobContext, rows_sha256: &str) -> Result<Noise, JobError> {
        let fresh = Noise::fresh_seed();
        let seed = noise_seeds::seed_for(&self.services.pool, ctx.job_id(), rows_sha256, fresh)
            .await
            .map_err(|e| JobError::Retryable(format!("reading the noise's seed: {e}")))?;
        match seed {
            Ok(seed) => Ok(Noise::from_seed(seed)),
            Err(noise_seeds::OtherRows) => Err(JobError::Permanent(
                "the dataset's file changed since an earlier attempt of this private synthesis \
                 drew its noise: the same noise over other rows would tell them apart; submit a \
                 new job"
                    .into(),
            )),
        }
    }

    /// Stores the fitted model in the object store and records it (`GET /v1/models`). Its id
    /// derives from the job's, so a retried attempt replaces the file and keeps one model.
    async fn save_model(
        &self,
        ctx: &JobContext,
        model: &saved::ModelFile,
        name: String,
        report: &Value,
    ) -> Result<uuid::Uuid, JobError> {
        let failed = |e: String| JobError::Retryable(format!("saving the model: {e}"));
        let id = uuid::Uuid::new_v5(&ctx.job_id(), b"saved model");
        let bytes = model.to_bytes();
        let (pool, tenant) = (&self.services.pool, ctx.tenant_id());
        let unrecorded = |e: sqlx::Error| {
            tracing::warn!(job = %ctx.job_id(), error = %e, "the model was not recorded");
            failed("it could not be recorded".into())
        };
        let mut record = shared::saved_models::SavedModel {
            id,
            tenant_id: ctx.tenant_id(),
            name,
            version: 0,
            synthesizer: model.synthesizer().into(),
            schema: sqlx::types::Json(model.schema()),
            training_rows: report["rows"]["train"].as_i64().unwrap_or(0),
            quality: sqlx::types::Json(report["quality"].clone()),
            privacy: sqlx::types::Json(report["privacy"].clone()),
            epsilon_spent: model.epsilon,
            description: model.description(),
            job_id: ctx.job_id(),
            object_key: String::new(),
            size_bytes: bytes.len() as i64,
            created_at: chrono::Utc::now(),
        };
        // Refused before the file is stored: a retried attempt's refusal leaves the earlier
        // attempt's model as it was.
        let over = |over| JobError::Permanent(format!("it could not go on: {over}"));
        shared::saved_models::fits(pool, &record)
            .await
            .map_err(unrecorded)?
            .map_err(over)?;
        let earlier = shared::saved_models::get(pool, tenant, id)
            .await
            .map_err(unrecorded)?
            .is_some();
        let objects = &self.services.objects;
        // Held first, as an output dataset's file is (see `register_dataset`).
        shared::object_deletes::hold(pool, tenant, Owner::Model, id)
            .await
            .map_err(unrecorded)?;
        record.object_key = objects
            .put_model(tenant, id, &bytes)
            .await
            .map_err(|e| failed(e.to_string()))?;
        if let Err(refused) = shared::saved_models::record(pool, &record)
            .await
            .map_err(unrecorded)?
        {
            // Another of the tenant's outputs took the room meanwhile (a model replacing its
            // own earlier record is never refused). A file no record shows would hold storage
            // no quota counts.
            if !earlier {
                shared::object_deletes::discard(pool, objects, tenant, Owner::Model, id).await;
            }
            return Err(over(refused));
        }
        Ok(id)
    }
}

/// Registers a job's output table as a dataset of the tenant (`outputs.dataset_id`), so an
/// import or another job reads it with no download. Its id derives from the job's, so a
/// retried attempt replaces the file and keeps one dataset.
pub(crate) async fn register_dataset(
    services: &Services,
    ctx: &JobContext,
    output: &std::path::Path,
    name: &str,
    parquet: bool,
) -> Result<uuid::Uuid, JobError> {
    use sha2::{Digest, Sha256};
    let objects = &services.objects;
    let failed = |e: String| JobError::Retryable(format!("registering the output dataset: {e}"));
    let copy = objects
        .scratch_file()
        .await
        .map_err(|e| failed(e.to_string()))?;
    tokio::fs::copy(output, &*copy)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let format = if parquet {
        datasets::Format::Parquet
    } else {
        datasets::Format::Csv
    };
    let path = copy.to_path_buf();
    let inspected = ctx
        .blocking(move || -> Result<_, String> {
            let (schema, preview) =
                crate::import::inspect(&path, format, datasets::Compression::None)?;
            let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
            Ok((
                schema,
                preview,
                bytes.len(),
                hex::encode(Sha256::digest(&bytes)),
            ))
        })
        .await
        .map_err(|e| failed(e.to_string()))?;
    let (schema, preview, size, sha256) = inspected.map_err(failed)?;
    let id = uuid::Uuid::new_v5(&ctx.job_id(), b"synthetic dataset");
    let dataset = datasets::Dataset {
        id,
        tenant_id: ctx.tenant_id(),
        name: format!("{}-{name}", ctx.job_id().simple()),
        format,
        compression: datasets::Compression::None,
        size_bytes: size as i64,
        sha256,
        schema: sqlx::types::Json(schema),
        preview: sqlx::types::Json(preview),
        created_at: chrono::Utc::now(),
    };
    // A retried attempt replaces the file, and the record with it. Held first: a deletion of
    // an earlier attempt's file under way is waited for, and a stop before the record leaves
    // the file to the object-deletes duty (`record_output` takes the mark back).
    shared::object_deletes::hold(&services.pool, ctx.tenant_id(), Owner::Dataset, id)
        .await
        .map_err(|e| failed(e.to_string()))?;
    objects
        .put_dataset(&copy, ctx.tenant_id(), id)
        .await
        .map_err(|e| failed(e.to_string()))?;
    match datasets::record_output(&services.pool, &dataset).await {
        Ok(Ok(())) => Ok(id),
        Ok(Err(over)) => {
            let (pool, tenant) = (&services.pool, ctx.tenant_id());
            shared::object_deletes::discard(pool, objects, tenant, Owner::Dataset, id).await;
            Err(JobError::Permanent(format!("the output dataset is {over}")))
        }
        Err(e) => Err(failed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::DataType;

    /// Three rows of one 64 KiB label, 100,000 asked for: the check counted 24 bytes a cell
    /// (4.8 MB) while drawing copies the label into every row (6.4 GB, twice with the frame).
    /// The worker's check counts the longest label a column draws, learned or declared.
    #[test]
    fn the_output_check_counts_the_labels_a_row_copies() {
        let limits = crate::limits::Limits {
            decompressed: 0,
            in_memory: 64 << 20,
            record: 0,
            document: 0,
        };
        let long = "c".repeat(64 << 10);
        let input = Table {
            columns: vec![
                Column::labels("c", vec![Some(long); 3]),
                Column::numbers("n", DataType::Float64, vec![Some(1.0); 3]),
            ],
        };
        let payload = |columns: Value| -> SynthesisPayload {
            serde_json::from_value(json!({
                "dataset_id": uuid::Uuid::nil(), "rows": 100_000, "columns": columns
            }))
            .unwrap()
        };
        let learned = output_row_bytes(&input, &payload(json!({})));
        assert_eq!(learned, 2 * 24 + 2 * (64 << 10));
        assert!(limits.output(100_000, learned).is_err());
        // Declared labels are counted where they are longer.
        let short = Table {
            columns: vec![Column::labels("c", vec![Some("a".into()); 3])],
        };
        let declared = payload(json!({"c": {"values": ["a", "b".repeat(200)]}}));
        assert_eq!(output_row_bytes(&short, &declared), 24 + 2 * 200);
    }

    /// The privacy audit: an attacker who knows the data, the payload, the seed and the code,
    /// but not the noise, tries to tell which of two neighbouring tables a private job's
    /// synthetic table came from (one row moved from the bulk to an outlier: the worst case
    /// for a histogram). Its error rates over many jobs bound ε from below (Jagielski et al.,
    /// "Auditing differentially private machine learning", NeurIPS 2020; Nasr et al. 2021);
    /// at 95 % confidence the bound must not exceed the ε the job claims.
    #[test]
    fn privacy_audit_finds_no_more_than_the_claimed_epsilon() {
        let (epsilon, trials) = (1.0, 1000);
        let table = |outlier: f64| {
            let mut x: Vec<Option<f64>> = (0..50).map(|i| Some(10.0 + (i % 5) as f64)).collect();
            x[0] = Some(outlier);
            Table {
                columns: vec![Column::numbers("x", DataType::Float64, x)],
            }
        };
        let (bulk, outlier) = (table(10.0), table(99.0));
        let payload: SynthesisPayload = serde_json::from_value(json!({
            "dataset_id": uuid::Uuid::nil(), "rows": 500, "epsilon": epsilon,
            "holdout_fraction": 0.0, "columns": {"x": {"min": 0, "max": 100}}
        }))
        .unwrap();
        let run = |input: &Table, seed: u64| synthesize(input, &payload, seed, &Quiet).unwrap();
        // "Outlier" when the seed reproduces the output from that table, or when values land
        // in the top histogram bin, where only the outlier's row can put mass.
        let says_outlier = |output: &Synthesis, seed: u64| -> bool {
            let values = &output.table.columns[0].values;
            if *values == run(&bulk, seed).table.columns[0].values {
                return false;
            }
            if *values == run(&outlier, seed).table.columns[0].values {
                return true;
            }
            let Values::Numbers(v) = values else { panic!() };
            v.iter().flatten().filter(|&&x| x > 96.875).count() >= 2
        };
        let (mut false_alarms, mut misses) = (0, 0);
        for seed in 0..trials {
            false_alarms += says_outlier(&run(&bulk, seed), seed) as u64;
            misses += !says_outlier(&run(&outlier, seed), seed) as u64;
        }
        let bound = epsilon_lower_bound(false_alarms, misses, trials);
        eprintln!("audit: ε ≥ {bound:.3} (false alarms {false_alarms}, misses {misses})");
        assert!(
            bound <= epsilon,
            "the audit shows ε ≥ {bound:.2} (false alarms {false_alarms}, misses {misses} \
             in {trials}), above the claimed {epsilon}"
        );
    }

    /// ε ≥ ln((1 − FNR)/FPR) for any test (and with the roles swapped), each rate taken at
    /// its one-sided 97.5 % Clopper–Pearson upper bound.
    fn epsilon_lower_bound(false_alarms: u64, misses: u64, trials: u64) -> f64 {
        use statrs::distribution::{Beta, ContinuousCDF};
        let upper = |k: u64| {
            if k == trials {
                1.0
            } else {
                Beta::new(k as f64 + 1.0, (trials - k) as f64)
                    .unwrap()
                    .inverse_cdf(0.975)
            }
        };
        let (fpr, fnr) = (upper(false_alarms), upper(misses));
        ((1.0 - fnr) / fpr)
            .ln()
            .max(((1.0 - fpr) / fnr).ln())
            .max(0.0)
    }

    /// A cancel while the quality report is computed stops it: its column pairs (minutes for
    /// 500 columns over a million rows) asked nobody, and the job ran them out.
    #[test]
    fn a_cancel_while_evaluating_stops_the_quality_report() {
        /// Asks to stop once evaluation starts.
        struct StopWhenEvaluating(std::sync::atomic::AtomicBool);
        impl Monitor for StopWhenEvaluating {
            fn stage(&self, _: f32, message: &str) {
                if message == "evaluating" {
                    self.0.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            fn epoch(&self, _: usize, _: usize, _: f64) {}
            fn checkpoint(&self) -> Result<(), Cancelled> {
                match self.0.load(std::sync::atomic::Ordering::SeqCst) {
                    true => Err(Cancelled),
                    false => Ok(()),
                }
            }
        }
        let input = Table {
            columns: (0..3)
                .map(|c| {
                    let x = (0..200)
                        .map(|r| Some(((r * (c + 1)) % 17) as f64))
                        .collect();
                    Column::numbers(&format!("c{c}"), DataType::Float64, x)
                })
                .collect(),
        };
        let payload: SynthesisPayload =
            serde_json::from_value(json!({"dataset_id": uuid::Uuid::nil(), "rows": 100})).unwrap();
        let monitor = StopWhenEvaluating(Default::default());
        let result = synthesize(&input, &payload, 1, &monitor);
        assert!(matches!(result, Err(JobError::Cancelled(_))), "not stopped");
    }

    /// A dataset of thousands of columns is refused before the fit, whose matrices grow as the
    /// square of the columns.
    #[test]
    fn too_many_columns_to_learn_are_refused_before_the_fit() {
        let wide = Table {
            columns: (0..=MAX_LEARNED_COLUMNS)
                .map(|i| {
                    let x = (0..3).map(|r| Some((r * i) as f64)).collect();
                    Column::numbers(&format!("c{i}"), DataType::Float64, x)
                })
                .collect(),
        };
        let payload: SynthesisPayload =
            serde_json::from_value(json!({"dataset_id": uuid::Uuid::nil(), "rows": 1})).unwrap();
        let started = std::time::Instant::now();
        let Err(JobError::Permanent(why)) = synthesize(&wide, &payload, 1, &Quiet) else {
            panic!("a fit of {} columns ran", MAX_LEARNED_COLUMNS + 1)
        };
        assert!(why.contains("at most 500"), "{why}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// A fixed combination naming an identifier learned its real values as one label and
    /// copied them into the output (the model's description said identifiers hold nothing).
    #[test]
    fn a_fixed_combination_naming_an_identifier_is_refused() {
        let rows = 50;
        let input = Table {
            columns: vec![
                Column::labels(
                    "email",
                    (0..rows)
                        .map(|i| Some(format!("person-{i}@x.org")))
                        .collect(),
                ),
                Column::labels(
                    "country",
                    (0..rows)
                        .map(|i| Some(["fr", "de", "it"][i % 3].to_owned()))
                        .collect(),
                ),
            ],
        };
        let payload: SynthesisPayload = serde_json::from_value(json!({
            "dataset_id": uuid::Uuid::nil(), "rows": 50,
            "constraints": [{"type": "fixed_combinations", "columns": ["email", "country"]}]
        }))
        .unwrap();
        let Err(JobError::Permanent(why)) = synthesize(&input, &payload, 1, &Quiet) else {
            panic!("the identifier was learned");
        };
        assert!(why.contains("\"email\", which is an identifier"), "{why}");
    }

    #[test]
    fn synthetic_numbers_stay_in_the_training_range_without_its_extremes_planted() {
        let real = Values::Numbers(vec![Some(1.0), None, Some(9.0), Some(5.0)]);
        let mut synthetic =
            Values::Numbers(vec![Some(3.0), Some(12.0), None, Some(2.0), Some(4.0)]);
        clamp(&mut synthetic, range(&real).unwrap());
        assert_eq!(
            synthetic,
            Values::Numbers(vec![Some(3.0), Some(9.0), None, Some(2.0), Some(4.0)])
        );
    }

    #[test]
    fn fresh_identifiers_stay_within_64_bit_integers() {
        let mut inputs: Vec<Option<f64>> = (1..=10).map(|i| Some(i as f64)).collect();
        inputs.push(Some(i64::MAX as f64));
        let fresh = fresh_identifiers(&Values::Numbers(inputs), 5, false);
        let Values::Numbers(fresh) = fresh else {
            panic!("{fresh:?}")
        };
        let fresh: Vec<f64> = fresh.into_iter().flatten().collect();
        assert_eq!(fresh, [11.0, 12.0, 13.0, 14.0, 15.0]);
        // Past what an i128 holds (its cast saturates): counted from 1 too.
        let huge = Values::Numbers(vec![Some(1e39), Some(2.0)]);
        assert_eq!(
            fresh_identifiers(&huge, 3, false),
            Values::Numbers(vec![Some(1.0), Some(3.0), Some(4.0)])
        );
    }

    #[test]
    fn fresh_identifiers_never_repeat_inputs() {
        let text = Values::Labels(vec![Some("syn-1".into()), Some("syn-3".into()), None]);
        let Values::Labels(fresh) = fresh_identifiers(&text, 3, false) else {
            panic!()
        };
        assert_eq!(
            fresh,
            [
                Some("syn-2".into()),
                Some("syn-4".into()),
                Some("syn-5".into())
            ]
        );
        let numbers = Values::Numbers(vec![Some(7.0), Some(3.0)]);
        assert_eq!(
            fresh_identifiers(&numbers, 2, false),
            Values::Numbers(vec![Some(8.0), Some(9.0)])
        );
        // Private: nothing read from the data.
        assert_eq!(
            fresh_identifiers(&numbers, 2, true),
            Values::Numbers(vec![Some(1.0), Some(2.0)])
        );
        let Values::Labels(fresh) = fresh_identifiers(&text, 2, true) else {
            panic!()
        };
        assert_eq!(fresh, [Some("syn-1".into()), Some("syn-2".into())]);
    }

    /// Identifiers past 2^53 (snowflake ids, say) repeated: a float there counts by two or
    /// more. They count exactly, past every value the rounded input may have been, and keep
    /// the column's integer type in the output.
    #[test]
    fn fresh_identifiers_past_two_to_the_53_are_distinct_and_unseen() {
        let real: Vec<i64> = vec![1_790_000_000_000_000_001, 1_790_000_000_000_000_257];
        let read = Values::Numbers(real.iter().map(|&v| Some(v as f64)).collect());
        let fresh = fresh_identifiers(&read, 1_000, false);
        let output = table::to_frame(&Table {
            columns: vec![Column {
                name: "id".into(),
                dtype: polars::prelude::DataType::Int64,
                values: fresh,
            }],
        })
        .unwrap();
        let ids = output.column("id").unwrap().i64().unwrap();
        let ids: Vec<i64> = ids.into_no_null_iter().collect();
        let distinct: HashSet<i64> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), 1_000, "identifiers repeated");
        assert!(
            ids.iter().all(|id| id > real.iter().max().unwrap()),
            "{:?}",
            &ids[..3]
        );
    }
}
