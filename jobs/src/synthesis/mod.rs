//! `synthesis`: fits a synthesizer on a dataset and samples a synthetic table of the same
//! shape, with a report of its quality and privacy.
//!
//! Pipeline: read (polars) → profile → seeded train/holdout split → fit (Gaussian copula, or a
//! TVAE with candle) → sample → fresh identifiers → evaluate → publish the synthetic file and
//! `report.json` as artifacts. Everything random comes from one seeded RNG, so a seed gives
//! the same output; without a seed the job id provides it, so a retry repeats the attempt.

pub mod copula;
pub mod metrics;
pub mod profile;
pub mod stats;
pub mod table;
pub mod tvae;

use async_trait::async_trait;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::{datasets, Cancelled, FieldError, JobContext, Problem};
use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Instant,
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{parse_payload, Handler, JobError, Services};
use copula::{ColumnSpec, Copula};
use profile::{ColumnProfile, Role};
use table::{Column, Table, Values};

/// Most rows one job generates.
pub const MAX_ROWS: i64 = 1_000_000;
pub const MAX_EPOCHS: u32 = 10_000;
pub const DEFAULT_EPOCHS: u32 = 100;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Synthesizer {
    #[default]
    GaussianCopula,
    Tvae,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    #[default]
    Parquet,
    Csv,
}

/// How one column is treated; anything left out is detected.
#[derive(Clone, Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnSettings {
    /// `numerical`, `datetime`, `categorical`, `identifier` (fresh values, never learned) or
    /// `skip` (left out of the output).
    #[serde(rename = "type")]
    pub role: Option<Role>,
    /// Generated values are kept at or above this (and DP histograms start here).
    pub min: Option<f64>,
    /// Generated values are kept at or below this (and DP histograms end here).
    pub max: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SynthesisPayload {
    pub dataset_id: Uuid,
    /// Rows to generate (1–1,000,000).
    pub rows: i64,
    #[serde(default)]
    pub synthesizer: Synthesizer,
    /// Differential privacy budget (ε > 0); `gaussian_copula` only.
    pub epsilon: Option<f64>,
    /// Same seed, same output. Defaults to one derived from the job id.
    pub seed: Option<u64>,
    /// Share of rows held out from fitting, to compare distances against (0 < f < 1).
    #[serde(default = "default_holdout")]
    pub holdout_fraction: f64,
    #[serde(default)]
    pub output_format: OutputFormat,
    /// Per-column settings, by column name.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnSettings>,
    /// Training epochs (`tvae` only; default 100).
    pub epochs: Option<u32>,
}

fn default_holdout() -> f64 {
    0.2
}

impl SynthesisPayload {
    pub(crate) fn check(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut refuse = |field: &str, message: String| {
            errors.push(FieldError::new(format!("payload.{field}"), message))
        };
        if !(1..=MAX_ROWS).contains(&self.rows) {
            refuse("rows", format!("must be between 1 and {MAX_ROWS}"));
        }
        if let Some(epsilon) = self.epsilon {
            if !(epsilon.is_finite() && epsilon > 0.0) {
                refuse("epsilon", "must be a positive number".into());
            } else if self.synthesizer == Synthesizer::Tvae {
                refuse(
                    "epsilon",
                    "differential privacy is available for gaussian_copula only: DP-SGD is \
                     not implemented for tvae"
                        .into(),
                );
            }
        }
        if !(self.holdout_fraction > 0.0 && self.holdout_fraction < 1.0) {
            refuse(
                "holdout_fraction",
                "must be between 0 and 1 (exclusive)".into(),
            );
        }
        match (self.epochs, self.synthesizer) {
            (Some(_), Synthesizer::GaussianCopula) => {
                refuse("epochs", "only tvae trains in epochs".into())
            }
            (Some(e), _) if !(1..=MAX_EPOCHS).contains(&e) => {
                refuse("epochs", format!("must be between 1 and {MAX_EPOCHS}"))
            }
            _ => {}
        }
        for (name, settings) in &self.columns {
            if let (Some(lo), Some(hi)) = (settings.min, settings.max) {
                if lo > hi {
                    refuse(&format!("columns.{name}.min"), "must not exceed max".into());
                }
            }
            for (bound, value) in [("min", settings.min), ("max", settings.max)] {
                if value.is_some_and(|v| !v.is_finite()) {
                    refuse(&format!("columns.{name}.{bound}"), "must be finite".into());
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn overrides(&self) -> BTreeMap<String, Role> {
        self.columns
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.role?)))
            .collect()
    }
}

/// What the pipeline tells its caller while it works.
pub trait Monitor: Sync {
    fn stage(&self, fraction: f32, message: &str);
    /// One training epoch done, with its mean loss.
    fn epoch(&self, epoch: usize, epochs: usize, loss: f64);
    /// Err once the work should stop.
    fn checkpoint(&self) -> Result<(), Cancelled>;
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

/// A synthetic table with its report.
pub struct Synthesis {
    pub table: Table,
    pub report: Value,
}

/// Fits and samples as `payload` says, on an already read table. `holdout_fraction` 0 fits
/// on every row (benchmarks).
pub fn synthesize(
    input: &Table,
    payload: &SynthesisPayload,
    seed: u64,
    monitor: &dyn Monitor,
) -> Result<Synthesis, JobError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let profiles = profile::profile(input, &payload.overrides());
    let roles: Vec<(String, Role)> = profiles.iter().map(|p| (p.name.clone(), p.role)).collect();
    let (train, holdout) = if payload.holdout_fraction > 0.0 {
        input.split(payload.holdout_fraction, &mut rng)
    } else {
        (input.clone(), Table::default())
    };
    let learned: Vec<(&Column, ColumnSpec)> = train
        .columns
        .iter()
        .zip(&profiles)
        .filter(|(_, p)| p.role.is_learned())
        .map(|(column, p)| {
            let settings = payload.columns.get(&column.name);
            let spec = ColumnSpec {
                role: p.role,
                bounds: (settings.and_then(|s| s.min), settings.and_then(|s| s.max)),
            };
            (column, spec)
        })
        .collect();
    if learned.is_empty() {
        return Err(JobError::Permanent(
            "nothing to learn: every column is an identifier or skipped".into(),
        ));
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
    let (sampled, budget) = match payload.synthesizer {
        Synthesizer::GaussianCopula => {
            let model = Copula::fit(&learned, payload.epsilon, &mut rng);
            monitor.checkpoint()?;
            monitor.stage(0.6, "sampling");
            (model.sample(rows, &mut rng), model.budget)
        }
        Synthesizer::Tvae => {
            let epochs = payload.epochs.unwrap_or(DEFAULT_EPOCHS) as usize;
            let model = tvae::Tvae::fit(&learned, epochs, rng.random(), monitor)?;
            monitor.stage(0.8, "sampling");
            (model.sample(rows, rng.random())?, None)
        }
    };
    let mut sampled = sampled;
    if payload.epsilon.is_none() {
        for ((column, spec), values) in learned.iter().zip(sampled.iter_mut()) {
            if spec.role != Role::Categorical {
                span_range(&column.values, values);
            }
        }
    }
    let fit_and_sample = started.elapsed();

    // Output columns in input order: learned ones from the model, fresh identifiers, no skips.
    let mut sampled = sampled.into_iter();
    let mut columns = Vec::new();
    for (column, p) in input.columns.iter().zip(&profiles) {
        let values = match p.role {
            Role::Skip => continue,
            Role::Identifier => fresh_identifiers(&column.values, rows),
            _ => sampled
                .next()
                .expect("one sampled column per learned column"),
        };
        columns.push(Column {
            values,
            ..column.clone()
        });
    }
    let synthetic = Table { columns };

    monitor.checkpoint()?;
    monitor.stage(0.9, "evaluating");
    let evaluated = Instant::now();
    let quality = metrics::quality(&train, &synthetic, &roles);
    let privacy = metrics::privacy(
        &train,
        &holdout,
        &synthetic,
        &roles,
        payload.epsilon,
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
        "quality": quality,
        "privacy": {
            "dcr_synthetic_to_train": privacy.dcr_synthetic_to_train,
            "dcr_holdout_to_train": privacy.dcr_holdout_to_train,
            "exact_match_rate": privacy.exact_match_rate,
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
    })
}

fn column_report(p: &ColumnProfile) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// Keeps a synthetic numeric column within the training column's range and makes it span
/// that range, as SDV's `enforce_min_max_values` does: the smallest and largest synthetic
/// values become the training minimum and maximum. Range-based comparisons (binning, scaled
/// distances) then line up. Private fits skip this: the range itself would leak.
fn span_range(real: &Values, synthetic: &mut Values) {
    let (Values::Numbers(real), Values::Numbers(synthetic)) = (real, synthetic) else {
        return;
    };
    let present = real.iter().flatten();
    let lo = present.clone().fold(f64::INFINITY, |a, &b| a.min(b));
    let hi = present.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    if lo > hi {
        return;
    }
    let mut lowest: Option<(usize, f64)> = None;
    let mut highest: Option<(usize, f64)> = None;
    for (row, value) in synthetic.iter_mut().enumerate() {
        if let Some(v) = value {
            *v = v.clamp(lo, hi);
            if lowest.is_none_or(|(_, l)| *v < l) {
                lowest = Some((row, *v));
            }
            if highest.is_none_or(|(_, h)| *v > h) {
                highest = Some((row, *v));
            }
        }
    }
    if let (Some((low_row, _)), Some((high_row, _))) = (lowest, highest) {
        if low_row != high_row {
            synthetic[low_row] = Some(lo);
            synthetic[high_row] = Some(hi);
        }
    }
}

/// Values that identify rows but were never seen: integers count on from the largest one,
/// text gets `syn-<n>` labels that no input value equals.
fn fresh_identifiers(original: &Values, rows: usize) -> Values {
    match original {
        Values::Numbers(values) => {
            let start = values
                .iter()
                .flatten()
                .fold(0.0f64, |a, &b| a.max(b))
                .floor()
                + 1.0;
            Values::Numbers((0..rows).map(|i| Some(start + i as f64)).collect())
        }
        Values::Labels(values) => {
            let taken: HashSet<&str> = values.iter().flatten().map(String::as_str).collect();
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

/// The `synthesis` job kind.
pub struct SynthesisJob {
    services: Arc<Services>,
}

impl SynthesisJob {
    pub fn new(services: Arc<Services>) -> Self {
        Self { services }
    }
}

/// What the pipeline, on a blocking thread, has to say; the job's task relays it.
enum Note {
    Stage(f32, String),
    Epoch {
        epoch: usize,
        epochs: usize,
        loss: f64,
    },
}

/// The pipeline's side of the relay: sends notes, reads the cancellation flag directly.
struct JobMonitor {
    ctx: JobContext,
    notes: tokio::sync::mpsc::UnboundedSender<Note>,
}

impl Monitor for JobMonitor {
    fn stage(&self, fraction: f32, message: &str) {
        let _ = self.notes.send(Note::Stage(fraction, message.to_owned()));
    }

    fn epoch(&self, epoch: usize, epochs: usize, loss: f64) {
        let _ = self.notes.send(Note::Epoch {
            epoch,
            epochs,
            loss,
        });
    }

    fn checkpoint(&self) -> Result<(), Cancelled> {
        self.ctx.checkpoint()
    }
}

async fn relay(ctx: &JobContext, note: Note) {
    match note {
        Note::Stage(fraction, message) => ctx.progress(fraction, message).await,
        Note::Epoch {
            epoch,
            epochs,
            loss,
        } => {
            let message = format!("epoch {epoch}/{epochs}");
            let data = json!({"epoch": epoch, "epochs": epochs, "loss": loss});
            ctx.report(message.clone(), data).await;
            // Training is 10 %–80 % of the job.
            let fraction = 0.1 + 0.7 * epoch as f32 / epochs as f32;
            ctx.progress(fraction, message).await;
        }
    }
}

#[async_trait]
impl Handler for SynthesisJob {
    fn kind(&self) -> &'static str {
        "synthesis"
    }

    fn validate(&self, payload: &Value) -> Result<(), Vec<FieldError>> {
        parse_payload::<SynthesisPayload>(payload)?.check()
    }

    async fn preflight(&self, tenant: Uuid, payload: &Value) -> Result<(), Problem> {
        let payload: SynthesisPayload = parse_payload(payload).map_err(Problem::validation)?;
        let dataset = crate::table_dataset(&self.services.pool, tenant, payload.dataset_id).await?;
        let known: HashSet<&str> = dataset.schema.iter().map(|c| c.name.as_str()).collect();
        let errors: Vec<FieldError> = payload
            .columns
            .keys()
            .filter(|name| !known.contains(name.as_str()))
            .map(|name| {
                FieldError::new(
                    format!("payload.columns.{name}"),
                    format!("the dataset has no column {name:?}"),
                )
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Problem::validation(errors))
        }
    }

    async fn run(&self, ctx: &JobContext, payload: Value) -> Result<Value, JobError> {
        let payload: SynthesisPayload = serde_json::from_value(payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
        let objects = &self.services.objects;
        let dataset = datasets::get(&self.services.pool, ctx.tenant_id(), payload.dataset_id)
            .await
            .map_err(|e| JobError::Retryable(format!("reading the dataset's record: {e}")))?
            .ok_or_else(|| JobError::Permanent("the dataset no longer exists".into()))?;
        let path = objects
            .dataset_file(ctx.tenant_id(), dataset.id)
            .await
            .map_err(|e| JobError::Retryable(format!("fetching the dataset: {e}")))?;
        let seed = payload.seed.unwrap_or_else(|| ctx.job_id().as_u64_pair().1);
        let output = objects
            .scratch_path()
            .await
            .map_err(|e| JobError::Retryable(format!("scratch space: {e}")))?;
        ctx.progress(0.0, "reading the dataset".to_owned()).await;

        let (notes, mut inbox) = tokio::sync::mpsc::unbounded_channel();
        let monitor = JobMonitor {
            ctx: ctx.clone(),
            notes,
        };
        let parquet = payload.output_format == OutputFormat::Parquet;
        let scratch = output.clone();
        let cap = self.services.limits.held();
        let work = tokio::task::spawn_blocking(move || -> Result<Value, JobError> {
            let input = table::read(&path, dataset.format, dataset.compression, cap)
                .map_err(|e| JobError::Permanent(format!("reading the dataset: {e}")))?;
            let synthesis = synthesize(&input, &payload, seed, &monitor)?;
            monitor.stage(0.95, "writing");
            table::write(&synthesis.table, &scratch, parquet)
                .map_err(|e| JobError::Retryable(format!("writing the synthetic table: {e}")))?;
            Ok(synthesis.report)
        });
        // The channel closes when the pipeline is done and drops its monitor.
        while let Some(note) = inbox.recv().await {
            relay(ctx, note).await;
        }
        let report = match work.await {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => {
                let _ = tokio::fs::remove_file(&output).await;
                return Err(e);
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&output).await;
                return Err(JobError::Permanent(format!("the synthesizer crashed: {e}")));
            }
        };

        // Publishing replaces files of the same name, so a retried attempt leaves one copy.
        let name = if parquet {
            "synthetic.parquet"
        } else {
            "synthetic.csv"
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
        let artifact = |name: &str, size: u64| {
            json!({
                "name": name,
                "size": size,
                "url": format!("/v1/jobs/{}/artifacts/{name}", ctx.job_id()),
            })
        };
        ctx.progress(1.0, "done".to_owned()).await;
        Ok(json!({
            "artifacts": [artifact(name, size), artifact("report.json", report_size)],
            "report": report,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(extra: Value) -> Value {
        let mut base = json!({"dataset_id": Uuid::nil(), "rows": 10});
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        base
    }

    fn fields(extra: Value) -> Vec<String> {
        match parse_payload::<SynthesisPayload>(&payload(extra)).and_then(|p| p.check()) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn validation_names_each_bad_field() {
        assert!(fields(json!({})).is_empty());
        assert_eq!(fields(json!({"rows": 0})), ["payload.rows"]);
        assert_eq!(fields(json!({"rows": -5})), ["payload.rows"]);
        assert_eq!(fields(json!({"rows": MAX_ROWS + 1})), ["payload.rows"]);
        assert_eq!(fields(json!({"epsilon": 0.0})), ["payload.epsilon"]);
        assert_eq!(fields(json!({"epsilon": -1})), ["payload.epsilon"]);
        assert_eq!(
            fields(json!({"epsilon": 1.0, "synthesizer": "tvae"})),
            ["payload.epsilon"]
        );
        assert_eq!(
            fields(json!({"holdout_fraction": 1.0})),
            ["payload.holdout_fraction"]
        );
        assert_eq!(
            fields(json!({"holdout_fraction": 0})),
            ["payload.holdout_fraction"]
        );
        assert_eq!(fields(json!({"epochs": 5})), ["payload.epochs"]);
        assert!(fields(json!({"epochs": 5, "synthesizer": "tvae"})).is_empty());
        assert_eq!(
            fields(json!({"synthesizer": "gan"})),
            ["payload.synthesizer"]
        );
        assert_eq!(
            fields(json!({"output_format": "xlsx"})),
            ["payload.output_format"]
        );
        assert_eq!(fields(json!({"bogus": 1})), ["payload.bogus"]);
        assert_eq!(
            fields(json!({"columns": {"age": {"min": 5, "max": 1}}})),
            ["payload.columns.age.min"]
        );
        assert_eq!(
            fields(json!({"columns": {"age": {"type": "wibble"}}})),
            ["payload.columns.age.type"]
        );
    }

    #[test]
    fn synthetic_numbers_span_the_training_range() {
        let real = Values::Numbers(vec![Some(1.0), None, Some(9.0), Some(5.0)]);
        let mut synthetic =
            Values::Numbers(vec![Some(3.0), Some(12.0), None, Some(2.0), Some(4.0)]);
        span_range(&real, &mut synthetic);
        assert_eq!(
            synthetic,
            Values::Numbers(vec![Some(3.0), Some(9.0), None, Some(1.0), Some(4.0)])
        );
    }

    #[test]
    fn fresh_identifiers_never_repeat_inputs() {
        let text = Values::Labels(vec![Some("syn-1".into()), Some("syn-3".into()), None]);
        let Values::Labels(fresh) = fresh_identifiers(&text, 3) else {
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
            fresh_identifiers(&numbers, 2),
            Values::Numbers(vec![Some(8.0), Some(9.0)])
        );
    }
}
