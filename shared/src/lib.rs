//! Contracts shared by `conveyor-api` and `conveyor-worker`: settings, telemetry, the job model,
//! the event model, errors, and access to PostgreSQL and Redis.

pub mod batch;
pub mod buckets;
pub mod claims;
pub mod connections;
pub mod context;
pub mod datasets;
pub mod db;
pub mod dispatch;
pub mod events;
pub mod isolated;
pub mod leader;
pub mod memory;
pub mod model;
pub mod noise_seeds;
pub mod object_deletes;
pub mod objects;
pub mod owned;
pub mod pages;
pub mod pipelines;
pub mod problem;
pub mod queue;
pub mod quotas;
pub mod rates;
pub mod redis_conn;
pub mod saved_models;
pub mod schedules;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod tenancy;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod usage;
pub mod webhooks;

pub use context::{Cancelled, CommitUnrecorded, Committing, JobContext};
pub use model::{Job, JobStatus};
pub use problem::{FieldError, Problem};
pub use settings::Settings;
