//! `sample`: rows drawn from a saved model (`synthesis` with `save_model: true`) without
//! refitting, optionally under conditions; the sampler is `synthesis::saved`. The output is an
//! artifact and a dataset of the tenant (`outputs.dataset_id`), like a synthesis's.

use async_trait::async_trait;
use shared::{saved_models, usage::Meter, JobContext};
use std::{sync::Arc, time::Instant};

use crate::{
    synthesis::{
        register_dataset, relay,
        saved::{ModelFile, Sampler},
        table::{self, Table},
        JobMonitor, Monitor,
    },
    Handler, JobError, Services,
};
use contracts::{
    sample::{ModelRef, SampleOutput, SampleOutputs, SamplePayload, SampleTimings, SampledGroup},
    synthesis::{row_bytes, OutputFormat},
    Artifact,
};

pub struct SampleHandler {
    services: Arc<Services>,
}

impl SampleHandler {
    pub fn new(services: Arc<Services>) -> Self {
        Self { services }
    }
}

#[async_trait]
impl Handler for SampleHandler {
    type Contract = contracts::sample::Sample;

    async fn run(
        &self,
        ctx: &JobContext,
        payload: SamplePayload,
    ) -> Result<SampleOutput, JobError> {
        let (pool, objects) = (&self.services.pool, &self.services.objects);
        let retryable = |what: &str, e: String| JobError::Retryable(format!("{what}: {e}"));
        ctx.progress(0.0, "loading the model".to_owned()).await;
        let record = saved_models::get(pool, ctx.tenant_id(), payload.model_id)
            .await
            .map_err(|e| retryable("reading the model's record", e.to_string()))?
            .ok_or_else(|| JobError::Permanent("the model no longer exists".into()))?;
        let bytes = objects
            .read_model(ctx.tenant_id(), record.id)
            .await
            .map_err(|e| retryable("reading the model", e.to_string()))?
            .ok_or_else(|| JobError::Permanent("the model no longer exists".into()))?;
        let seed = payload.seed.unwrap_or_else(|| ctx.job_id().as_u64_pair().1);
        // Removed when dropped, whichever way the attempt ends (moved away when published).
        let output = objects
            .scratch_file()
            .await
            .map_err(|e| retryable("scratch space", e.to_string()))?;
        let parquet = payload.format == OutputFormat::Parquet;
        let groups = payload.groups();
        let total = payload.total_rows();
        let (monitor, mut inbox) = JobMonitor::new(ctx, self.services.limits.in_memory);
        let meter = ctx.meter().clone();
        let scratch = output.to_path_buf();
        let limits = self.services.limits;
        let work = tokio::task::spawn_blocking(move || {
            meter.timed(|| -> Result<Sampled, JobError> {
                let model = ModelFile::from_bytes(&bytes)
                    .map_err(|e| JobError::Permanent(format!("reading the model: {e}")))?;
                let row_bytes = row_bytes(model.columns.len(), model.longest_labels());
                limits.output(total as u64, row_bytes)?;
                let mut sampler = Sampler::new(&model, seed);
                let mut table: Option<Table> = None;
                let started = Instant::now();
                let mut done = 0;
                for (i, (_, conditions, rows)) in groups.iter().enumerate() {
                    monitor.checkpoint()?;
                    let message = format!("sampling group {} of {}", i + 1, groups.len());
                    monitor.stage(0.05 + 0.6 * done as f32 / total as f32, &message);
                    let part = sampler.sample(*rows as usize, conditions)?;
                    match &mut table {
                        None => table = Some(part),
                        Some(all) => {
                            for (column, more) in all.columns.iter_mut().zip(part.columns) {
                                column.values.append(more.values);
                            }
                        }
                    }
                    done += rows;
                }
                let table = table.unwrap_or_default();
                let sample_seconds = started.elapsed().as_secs_f64();
                monitor.checkpoint()?;
                monitor.stage(0.7, &format!("writing {total} rows"));
                let written = Instant::now();
                table::write(&table, &scratch, parquet)
                    .map_err(|e| JobError::Retryable(format!("writing the sample: {e}")))?;
                Meter::add(&meter.synthetic_rows, table.rows() as i64);
                let groups = groups
                    .iter()
                    .map(|(_, conditions, rows)| SampledGroup {
                        conditions: conditions.clone(),
                        rows: *rows,
                    })
                    .collect();
                Ok(Sampled {
                    rows: table.rows(),
                    groups,
                    timings: SampleTimings {
                        sample_seconds,
                        write_seconds: written.elapsed().as_secs_f64(),
                        rows_per_second: table.rows() as f64 / sample_seconds.max(1e-9),
                        threads: rayon::current_num_threads(),
                    },
                })
            })
        });
        // The channel closes when the work is done and drops its monitor.
        while let Some(note) = inbox.recv().await {
            relay(ctx, note).await;
        }
        let sampled = match work.await {
            Ok(Ok(sampled)) => sampled,
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(JobError::crashed(e)),
        };
        ctx.progress(0.85, "registering the dataset".to_owned())
            .await;
        let name = if parquet {
            "sample.parquet"
        } else {
            "sample.csv"
        };
        let _publishing = ctx.committing().await?;
        let dataset_id = register_dataset(&self.services, ctx, &output, name, parquet).await?;
        let size = objects
            .put_artifact_file(&output, ctx.job_id(), name)
            .await
            .map_err(|e| retryable(&format!("publishing {name}"), e.to_string()))?;
        ctx.progress(1.0, "done".to_owned()).await;
        Ok(SampleOutput {
            rows: sampled.rows,
            seed,
            groups: sampled.groups,
            timings: sampled.timings,
            artifacts: vec![Artifact::of_job(ctx.job_id(), name, size)],
            outputs: SampleOutputs { dataset_id },
            model: ModelRef {
                id: record.id,
                name: record.name,
                version: record.version,
            },
        })
    }
}

/// What the blocking part of a sample made.
struct Sampled {
    rows: usize,
    groups: Vec<SampledGroup>,
    timings: SampleTimings,
}
