//! `synthesis`: synthetic rows that keep a table's shapes and relations (Gaussian copula, TVAE
//! or CTGAN), optionally with differential privacy.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shared::FieldError;
use std::collections::{BTreeMap, HashSet};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{Context, Contract, Refusal};

pub struct Synthesis;

#[async_trait]
impl Contract for Synthesis {
    const KIND: &'static str = "synthesis";
    type Payload = SynthesisPayload;
    type Output = SynthesisOutput;

    fn check(&self, payload: &SynthesisPayload) -> Result<(), Vec<FieldError>> {
        payload.check()
    }

    async fn preflight(
        &self,
        context: &Context,
        tenant: Uuid,
        payload: &SynthesisPayload,
    ) -> Result<(), Refusal> {
        let dataset = crate::table_dataset(&context.pool, tenant, payload.dataset_id).await?;
        let known: HashSet<&str> = dataset.schema.iter().map(|c| c.name.as_str()).collect();
        let mut errors: Vec<FieldError> = payload
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
        let is_text = |name: &str| {
            dataset.schema.iter().any(|c| {
                c.name == name && matches!(c.data_type.as_str(), "text" | "boolean" | "jsonb")
            })
        };
        for (i, constraint) in payload.constraints.iter().enumerate() {
            for name in constraint.columns() {
                let problem = if !known.contains(name) {
                    format!("the dataset has no column {name:?}")
                } else if constraint.is_numeric() && is_text(name) {
                    format!("{name:?} holds text: this constraint compares numbers and dates")
                } else {
                    continue;
                };
                errors.push(FieldError::new(
                    format!("payload.constraints[{i}]"),
                    problem,
                ));
            }
        }
        if let Some(why) = output_too_large(
            payload.rows.max(0) as u64,
            row_bytes(dataset.schema.len(), []),
            context.max_in_memory_bytes,
        ) {
            errors.push(FieldError::new("payload.rows", why));
        }
        crate::refused(errors).map_err(Refusal::Invalid)
    }
}

/// What one synthetic cell holds while its table is drawn and written: its value and the
/// frame's copy of it.
pub const OUTPUT_CELL_BYTES: u64 = 24;

/// What one synthetic row of `columns` takes in memory as it is drawn and written: a cell
/// each, and in each column that draws labels, the longest of them, which is copied whole into
/// every row that draws it (and into the frame's copy): three learned labels of 256 KiB drawn
/// for a million rows were 256 GiB.
pub fn row_bytes(columns: usize, longest_labels: impl IntoIterator<Item = u64>) -> u64 {
    let labels = longest_labels
        .into_iter()
        .fold(0u64, u64::saturating_add)
        .saturating_mul(2);
    (columns as u64)
        .saturating_mul(OUTPUT_CELL_BYTES)
        .saturating_add(labels)
}

/// Why a synthetic table of `rows` of `row_bytes` each (see [`row_bytes`]) does not fit `cap`
/// bytes in memory as it is drawn and written, if it does not. The API refuses such a job at
/// submit (with the deployment's cap, not knowing the labels), and a worker again before it
/// draws a row (with its own, and the labels it would draw): a larger one would take the
/// worker, and every job in it, down.
pub fn output_too_large(rows: u64, row_bytes: u64, cap: u64) -> Option<String> {
    let bytes = rows.saturating_mul(row_bytes);
    (bytes > cap).then(|| {
        format!(
            "{rows} rows of about {row_bytes} bytes each take about {} MiB in memory, more \
             than the {} MiB cap (CONVEYOR_MAX_IN_MEMORY_BYTES); ask for fewer rows",
            bytes >> 20,
            cap >> 20
        )
    })
}

/// How a column is synthesized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Learned as a distribution of numbers (integers and floats).
    Numerical,
    /// Dates and times, learned as numbers.
    Datetime,
    /// Learned as frequencies of labels.
    Categorical,
    /// Unique per row: never learned, fresh values are generated.
    Identifier,
    /// Left out of the synthetic table.
    Skip,
}

impl Role {
    pub fn is_learned(self) -> bool {
        matches!(self, Role::Numerical | Role::Datetime | Role::Categorical)
    }
}

/// Most rows one job generates.
pub const MAX_ROWS: i64 = 1_000_000;
/// The range of ε a private fit accepts: below, the noise drowns everything; above, the
/// promise means nothing.
pub const EPSILON_RANGE: std::ops::RangeInclusive<f64> = 0.01..=100.0;
/// Most labels one column may declare, and the longest.
pub const MAX_DECLARED_VALUES: usize = 10_000;
pub const MAX_VALUE_BYTES: usize = 256;
pub const MAX_EPOCHS: u32 = 10_000;
pub const MAX_MODEL_NAME_BYTES: usize = 100;
pub const DEFAULT_EPOCHS: u32 = 100;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Synthesizer {
    #[default]
    GaussianCopula,
    Tvae,
    Ctgan,
}

impl Synthesizer {
    /// Whether it trains a network in epochs.
    pub fn trains_in_epochs(self) -> bool {
        matches!(self, Synthesizer::Tvae | Synthesizer::Ctgan)
    }

    /// Its name in payloads.
    pub fn name(self) -> &'static str {
        match self {
            Synthesizer::GaussianCopula => "gaussian_copula",
            Synthesizer::Tvae => "tvae",
            Synthesizer::Ctgan => "ctgan",
        }
    }
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
    /// Every label the column may hold, declared as public: a private fit counts these
    /// (others as missing) instead of keeping the data's own labels above a noisy threshold.
    pub values: Option<Vec<String>>,
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
    /// Training epochs (`tvae` and `ctgan` only; default 100).
    pub epochs: Option<u32>,
    /// Rules every synthetic row keeps.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Keep the fitted model (any synthesizer), to sample from later with `sample` jobs
    /// without refitting: `outputs.model_id`, listed at `GET /v1/models`.
    #[serde(default)]
    pub save_model: bool,
    /// The saved model's name (default: the dataset's); versions count per name.
    pub model_name: Option<String>,
}

/// A rule every synthetic row keeps (rows with a missing value in its columns pass).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Constraint {
    /// `low` ≤ `high` (`<` when `strict`): a check-out after its check-in.
    Inequality {
        low: String,
        high: String,
        #[serde(default)]
        strict: bool,
    },
    /// `low` ≤ `column` ≤ `high`.
    Range {
        low: String,
        column: String,
        high: String,
    },
    /// The columns' values appear only in combinations the data holds (city with its
    /// country); they are learned as one column.
    FixedCombinations { columns: Vec<String> },
    /// `column` > 0.
    Positive { column: String },
    /// `column` < 0.
    Negative { column: String },
}

/// Most constraints one job takes, and most columns in one fixed combination.
pub const MAX_CONSTRAINTS: usize = 32;
pub const MAX_COMBINED_COLUMNS: usize = 8;

impl Constraint {
    /// The columns it reads.
    pub fn columns(&self) -> Vec<&str> {
        match self {
            Constraint::Inequality { low, high, .. } => vec![low, high],
            Constraint::Range { low, column, high } => vec![low, column, high],
            Constraint::FixedCombinations { columns } => {
                columns.iter().map(String::as_str).collect()
            }
            Constraint::Positive { column } | Constraint::Negative { column } => vec![column],
        }
    }

    /// Whether it compares numbers (the rest combine any values).
    pub fn is_numeric(&self) -> bool {
        !matches!(self, Constraint::FixedCombinations { .. })
    }
}

fn default_holdout() -> f64 {
    0.2
}

impl SynthesisPayload {
    pub fn check(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut refuse = |field: &str, message: String| {
            errors.push(FieldError::new(format!("payload.{field}"), message))
        };
        if !(1..=MAX_ROWS).contains(&self.rows) {
            refuse("rows", format!("must be between 1 and {MAX_ROWS}"));
        }
        if let Some(epsilon) = self.epsilon {
            if !EPSILON_RANGE.contains(&epsilon) {
                refuse(
                    "epsilon",
                    format!(
                        "must be between {} and {}",
                        EPSILON_RANGE.start(),
                        EPSILON_RANGE.end()
                    ),
                );
            } else if self.synthesizer.trains_in_epochs() {
                refuse(
                    "epsilon",
                    format!(
                        "differential privacy is available for gaussian_copula only: DP-SGD \
                         is not implemented for {}",
                        self.synthesizer.name()
                    ),
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
                refuse("epochs", "only tvae and ctgan train in epochs".into())
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
            if let Some(values) = &settings.values {
                let field = format!("columns.{name}.values");
                let distinct: HashSet<&String> = values.iter().collect();
                if values.is_empty() || values.len() > MAX_DECLARED_VALUES {
                    refuse(
                        &field,
                        format!("must hold 1 to {MAX_DECLARED_VALUES} labels"),
                    );
                } else if values.iter().any(|v| v.len() > MAX_VALUE_BYTES) {
                    refuse(
                        &field,
                        format!("labels are at most {MAX_VALUE_BYTES} bytes"),
                    );
                } else if distinct.len() < values.len() {
                    refuse(&field, "must not repeat a label".into());
                }
            }
        }
        match &self.model_name {
            Some(_) if !self.save_model => refuse(
                "model_name",
                "names a saved model: set save_model too".into(),
            ),
            Some(name) if name.trim().is_empty() || name.len() > MAX_MODEL_NAME_BYTES => refuse(
                "model_name",
                format!("must be 1 to {MAX_MODEL_NAME_BYTES} bytes"),
            ),
            _ => {}
        }
        if self.constraints.len() > MAX_CONSTRAINTS {
            refuse(
                "constraints",
                format!("at most {MAX_CONSTRAINTS} constraints"),
            );
        }
        let mut combined = HashSet::new();
        for (i, constraint) in self.constraints.iter().enumerate() {
            let columns = constraint.columns();
            let distinct: HashSet<&str> = columns.iter().copied().collect();
            if distinct.len() < columns.len() {
                refuse(&format!("constraints[{i}]"), "names a column twice".into());
            }
            if let Constraint::FixedCombinations { columns } = constraint {
                if !(2..=MAX_COMBINED_COLUMNS).contains(&columns.len()) {
                    refuse(
                        &format!("constraints[{i}].columns"),
                        format!("must name 2 to {MAX_COMBINED_COLUMNS} columns"),
                    );
                }
                for column in columns {
                    if !combined.insert(column.as_str()) {
                        refuse(
                            &format!("constraints[{i}].columns"),
                            format!("{column:?} is already in another fixed combination"),
                        );
                    }
                }
            }
        }
        crate::refused(errors)
    }

    /// The roles the payload sets, by column.
    pub fn overrides(&self) -> BTreeMap<String, Role> {
        self.columns
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.role?)))
            .collect()
    }
}

/// A synthesis's result.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SynthesisOutput {
    /// The synthetic table, `report.json` and `report.html`.
    pub artifacts: Vec<crate::Artifact>,
    pub outputs: SynthesisOutputs,
    /// The quality and privacy report, as in `report.json`.
    #[schema(value_type = Object)]
    pub report: serde_json::Value,
}

/// What a later step reads: the synthetic table as a dataset, and the saved model.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SynthesisOutputs {
    pub dataset_id: uuid::Uuid,
    /// With `save_model: true`; null otherwise.
    pub model_id: Option<uuid::Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_payload;
    use serde_json::{json, Value};

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
        assert_eq!(fields(json!({"epsilon": 0.001})), ["payload.epsilon"]);
        assert_eq!(fields(json!({"epsilon": 1000})), ["payload.epsilon"]);
        assert!(
            fields(json!({"epsilon": 0.5, "columns": {"c": {"values": ["a", "b"]}}})).is_empty()
        );
        assert_eq!(
            fields(json!({"columns": {"c": {"values": []}}})),
            ["payload.columns.c.values"]
        );
        assert_eq!(
            fields(json!({"columns": {"c": {"values": ["a", "a"]}}})),
            ["payload.columns.c.values"]
        );
        assert_eq!(
            fields(json!({"columns": {"c": {"values": ["x".repeat(300)]}}})),
            ["payload.columns.c.values"]
        );
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
        assert!(fields(json!({"epochs": 5, "synthesizer": "ctgan"})).is_empty());
        assert_eq!(
            fields(json!({"epochs": 0, "synthesizer": "ctgan"})),
            ["payload.epochs"]
        );
        assert_eq!(
            fields(json!({"epsilon": 1.0, "synthesizer": "ctgan"})),
            ["payload.epsilon"]
        );
        assert!(fields(json!({"save_model": true, "synthesizer": "ctgan"})).is_empty());
        assert_eq!(
            fields(json!({"synthesizer": "gan"})),
            ["payload.synthesizer"]
        );
        assert_eq!(
            fields(json!({"output_format": "xlsx"})),
            ["payload.output_format"]
        );
        assert_eq!(fields(json!({"bogus": 1})), ["payload.bogus"]);
        assert!(fields(json!({"save_model": true, "model_name": "orders"})).is_empty());
        assert!(fields(json!({"save_model": true, "synthesizer": "tvae"})).is_empty());
        assert_eq!(fields(json!({"model_name": "x"})), ["payload.model_name"]);
        assert_eq!(
            fields(json!({"save_model": true, "model_name": " "})),
            ["payload.model_name"]
        );
        assert_eq!(
            fields(json!({"columns": {"age": {"min": 5, "max": 1}}})),
            ["payload.columns.age.min"]
        );
        assert_eq!(
            fields(json!({"columns": {"age": {"type": "wibble"}}})),
            ["payload.columns.age.type"]
        );
        assert!(fields(json!({"constraints": [
            {"type": "inequality", "low": "in", "high": "out"},
            {"type": "range", "low": "a", "column": "b", "high": "c"},
            {"type": "fixed_combinations", "columns": ["city", "country"]},
            {"type": "positive", "column": "p"}, {"type": "negative", "column": "n"}
        ]}))
        .is_empty());
        assert_eq!(
            fields(json!({"constraints": [{"type": "inequality", "low": "a", "high": "a"}]})),
            ["payload.constraints[0]"]
        );
        assert_eq!(
            fields(json!({"constraints": [
                {"type": "fixed_combinations", "columns": ["a", "b"]},
                {"type": "fixed_combinations", "columns": ["b", "c"]}
            ]})),
            ["payload.constraints[1].columns"]
        );
        assert_eq!(
            fields(json!({"constraints": [{"type": "fixed_combinations", "columns": ["a"]}]})),
            ["payload.constraints[0].columns"]
        );
        assert_eq!(
            fields(json!({"constraints": [{"type": "between", "column": "a"}]})),
            ["payload.constraints[0].type"]
        );
    }
}
