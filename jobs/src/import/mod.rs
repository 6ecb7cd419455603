//! `import`: a dataset into a PostgreSQL table, streamed through `COPY` into a staging table,
//! then applied to the target in one transaction (create, append, replace or upsert). A failed,
//! cancelled or killed import leaves the target exactly as it was.

mod inspect;
mod load;
pub mod parquet_footer;
pub(crate) mod source;
mod stream;
mod types;

pub use inspect::{inspect, serve as serve_inspect};

pub use contracts::import::{
    quote_ident, valid_identifier, ColumnSpec, CsvOptions, EncodingErrors, Import, ImportOutput,
    ImportPayload, Mode, OnError, Target, DEFAULT_MAX_ERRORS,
};

use async_trait::async_trait;

use shared::JobContext;
use std::sync::Arc;

use crate::{Handler, JobError, Services};

pub struct ImportHandler {
    services: Arc<Services>,
}

impl ImportHandler {
    pub fn new(services: Arc<Services>) -> Self {
        Self { services }
    }
}

#[async_trait]
impl Handler for ImportHandler {
    type Contract = Import;

    async fn run(
        &self,
        ctx: &JobContext,
        payload: ImportPayload,
    ) -> Result<ImportOutput, JobError> {
        load::run(&self.services, ctx, &payload).await
    }

    /// Staging tables of imports that ended while their worker was gone.
    async fn sweep(&self) -> anyhow::Result<()> {
        let control = &self.services.pool;
        self.services
            .sweep_targets("staging tables of ended imports", |target| async move {
                load::sweep_staging(&target, control).await
            })
            .await
    }
}
