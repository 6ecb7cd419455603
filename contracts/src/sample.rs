//! `sample`: rows drawn from a saved model (`synthesis` with `save_model: true`), without
//! refitting, optionally under conditions (SDV's `sample_from_conditions`).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::{saved_models::ModelColumn, FieldError};
use std::collections::BTreeMap;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{synthesis::OutputFormat, Context, Contract, Refusal};

pub struct Sample;

/// Most rows one `sample` job generates, all condition groups together.
pub const MAX_SAMPLE_ROWS: i64 = 10_000_000;
/// Most condition groups one job takes.
pub const MAX_CONDITION_GROUPS: usize = 100;

/// Column name → the value every sampled row has there (a label, a number, a boolean, or
/// `null` for missing).
pub type ConditionMap = BTreeMap<String, Value>;

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SamplePayload {
    /// A saved model of the tenant (`GET /v1/models`).
    pub model_id: Uuid,
    /// Rows to generate (1–10,000,000). With condition groups, optional: each group says
    /// its own, and `rows` (if given) must be their sum.
    pub rows: Option<i64>,
    /// Same model and seed, same output. Defaults to one derived from the job id.
    pub seed: Option<u64>,
    /// `parquet` (default) or `csv`.
    #[serde(default)]
    pub format: OutputFormat,
    /// `{"region": "west"}`: every row has those values; or a list of groups
    /// `[{"conditions": {...}, "rows": N}, ...]`, sampled in order.
    pub conditions: Option<Conditions>,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Conditions {
    #[schema(value_type = Object)]
    All(ConditionMap),
    Groups(Vec<ConditionGroup>),
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionGroup {
    #[schema(value_type = Object)]
    pub conditions: ConditionMap,
    pub rows: i64,
}

impl SamplePayload {
    /// Each group of rows to sample: its field path, conditions and row count.
    pub fn groups(&self) -> Vec<(String, ConditionMap, i64)> {
        match &self.conditions {
            None => vec![("conditions".into(), BTreeMap::new(), self.rows.unwrap_or(0))],
            Some(Conditions::All(map)) => {
                vec![("conditions".into(), map.clone(), self.rows.unwrap_or(0))]
            }
            Some(Conditions::Groups(groups)) => groups
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let field = format!("conditions[{i}].conditions");
                    (field, g.conditions.clone(), g.rows)
                })
                .collect(),
        }
    }

    /// Rows in all.
    pub fn total_rows(&self) -> i64 {
        self.groups().iter().map(|g| g.2).sum()
    }

    pub fn check(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut refuse = |field: &str, message: String| {
            errors.push(FieldError::new(format!("payload.{field}"), message))
        };
        let range = format!("must be between 1 and {MAX_SAMPLE_ROWS}");
        match &self.conditions {
            Some(Conditions::Groups(groups)) => {
                if groups.is_empty() || groups.len() > MAX_CONDITION_GROUPS {
                    refuse(
                        "conditions",
                        format!("must hold 1 to {MAX_CONDITION_GROUPS} groups"),
                    );
                }
                for (i, group) in groups.iter().enumerate() {
                    if !(1..=MAX_SAMPLE_ROWS).contains(&group.rows) {
                        refuse(&format!("conditions[{i}].rows"), range.clone());
                    }
                }
                let total = groups
                    .iter()
                    .fold(0i64, |sum, g| sum.saturating_add(g.rows.max(0)));
                if total > MAX_SAMPLE_ROWS {
                    refuse(
                        "conditions",
                        format!("the groups ask for {total} rows; at most {MAX_SAMPLE_ROWS}"),
                    );
                } else if self.rows.is_some_and(|rows| rows != total) {
                    refuse(
                        "rows",
                        format!("must be the groups' sum ({total}), or left out"),
                    );
                }
            }
            _ => match self.rows {
                None => refuse("rows", "required".into()),
                Some(rows) if !(1..=MAX_SAMPLE_ROWS).contains(&rows) => refuse("rows", range),
                _ => {}
            },
        }
        for (field, conditions, _) in self.groups() {
            for (column, value) in &conditions {
                if matches!(value, Value::Array(_) | Value::Object(_)) {
                    refuse(
                        &format!("{field}.{column}"),
                        "must be one value: a label, a number, a boolean or null".into(),
                    );
                }
            }
        }
        crate::refused(errors)
    }
}

/// Whether a condition's value is one of a categorical column's levels.
pub fn same_value(level: &Value, wanted: &Value) -> bool {
    match (level, wanted) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        // Booleans are learned as the labels "true" and "false".
        (Value::String(a), Value::Bool(b)) => *a == b.to_string(),
        (a, b) => a == b,
    }
}

/// Why `value` cannot be asked of `column`, if it cannot.
fn refusal(column: &ModelColumn, value: &Value) -> Option<String> {
    if column.role == "identifier" {
        return Some(format!(
            "{:?} is an identifier: the model generates fresh values for it, so it cannot be \
             conditioned",
            column.name
        ));
    }
    // A date or datetime column, whatever its role: asked as text, read as a number.
    match temporal(&column.data_type, value) {
        Some(Ok(number)) => {
            // Levels are dates; a model saved before they were has them as numbers.
            let same = |level: &Value| {
                temporal(&column.data_type, level) == Some(Ok(number))
                    || same_value(level, &Value::from(number))
            };
            return refusal_of_levels(column, value, same);
        }
        Some(Err(problem)) => return Some(format!("{:?}: {problem}", column.name)),
        None if column.role == "datetime" && !value.is_null() => {
            return Some(format!(
                "{:?} holds {}: conditions are taken on dates and datetimes only",
                column.name, column.data_type
            ))
        }
        None => {}
    }
    if column.levels.is_some() {
        return refusal_of_levels(column, value, |level| same_value(level, value));
    }
    if column.role == "numerical" && !matches!(value, Value::Number(_) | Value::Null) {
        return Some(format!("{:?} holds numbers: ask for a number", column.name));
    }
    None
}

/// Why `value` is none of the column's levels, if it has levels and it is none.
fn refusal_of_levels(
    column: &ModelColumn,
    value: &Value,
    same: impl Fn(&Value) -> bool,
) -> Option<String> {
    // A partial list (or one of a model saved before lists were bounded, which could hold
    // millions, each scanned per condition) leaves the check to the job.
    let levels = column.levels.as_ref().filter(|levels| {
        !column.more_levels && levels.len() <= shared::saved_models::MAX_SHOWN_LEVELS
    });
    if let Some(levels) = levels {
        if !levels.iter().any(same) {
            // Each level shortened: a model's levels may be megabytes long, and this text is
            // built for every group of every job of a request.
            let shown: Vec<String> = levels.iter().take(20).map(shortened).collect();
            let more = if levels.len() > 20 { ", …" } else { "" };
            return Some(format!(
                "the model never generates {value} in {:?}: its values are {}{more}",
                column.name,
                shown.join(", ")
            ));
        }
    }
    None
}

/// A level as a refusal shows it: its JSON, cut after 64 characters.
fn shortened(level: &Value) -> String {
    let text = level.to_string();
    match text.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// None for a type that is not a date or datetime; Some(None) for a date; the units per second
/// of a datetime.
fn units_per_second(data_type: &str) -> Option<Option<i64>> {
    if data_type == "date" {
        return Some(None);
    }
    let unit = data_type
        .strip_prefix("datetime[")?
        .split([',', ']'])
        .next()?;
    Some(Some(match unit {
        "ns" => 1_000_000_000,
        "μs" | "us" => 1_000_000,
        "ms" => 1_000,
        _ => return None,
    }))
}

/// A date or datetime column's learned number as a condition asks for it (the inverse of
/// [`temporal`]): `2024-03-05`, or RFC 3339 in UTC. None for other types.
pub fn temporal_text(data_type: &str, number: f64) -> Option<String> {
    let whole = number as i64;
    match units_per_second(data_type)? {
        None => {
            let epoch = chrono::DateTime::UNIX_EPOCH.date_naive();
            let day = epoch.checked_add_signed(chrono::TimeDelta::try_days(whole)?)?;
            Some(day.format("%Y-%m-%d").to_string())
        }
        Some(per_second) => {
            let nanos = whole.checked_mul(1_000_000_000 / per_second)?;
            let instant = chrono::DateTime::from_timestamp(
                nanos.div_euclid(1_000_000_000),
                nanos.rem_euclid(1_000_000_000) as u32,
            )?;
            Some(instant.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        }
    }
}

/// A condition on a date or datetime column as the number a model learns for it: days since
/// 1970-01-01 for a date, the column's unit since 1970-01-01T00:00:00Z for a datetime. Dates
/// are asked as `2024-03-05`; datetimes in RFC 3339 (`2024-03-05T10:30:00Z`), or without an
/// offset as UTC. None for columns of other types, and for `null` (missing).
pub fn temporal(data_type: &str, value: &Value) -> Option<Result<f64, String>> {
    let per_second = units_per_second(data_type)?;
    let text = match value {
        Value::Null => return None,
        Value::String(text) => text.trim(),
        _ => return Some(Err("ask for a date or time as text".into())),
    };
    let Some(per_second) = per_second else {
        return Some(
            chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map(|date| (date - chrono::DateTime::UNIX_EPOCH.date_naive()).num_days() as f64)
                .map_err(|_| format!("{text:?} is not a date: ask as YYYY-MM-DD")),
        );
    };
    let instant = chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.to_utc())
        .or_else(|_| {
            ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .iter()
                .find_map(|format| chrono::NaiveDateTime::parse_from_str(text, format).ok())
                .map(|t| t.and_utc())
                .ok_or(())
        });
    let Ok(instant) = instant else {
        return Some(Err(format!(
            "{text:?} is not a datetime: ask in RFC 3339, as 2024-03-05T10:30:00Z"
        )));
    };
    // Whole units of the column only: a finer time would never be generated.
    let nanos_per_unit = 1_000_000_000 / per_second;
    if i64::from(instant.timestamp_subsec_nanos()) % nanos_per_unit != 0 {
        return Some(Err(format!("{text:?} is finer than the column's unit")));
    }
    let subsec_units = i64::from(instant.timestamp_subsec_nanos()) / nanos_per_unit;
    Some(
        instant
            .timestamp()
            .checked_mul(per_second)
            .and_then(|units| units.checked_add(subsec_units))
            .map(|units| units as f64)
            .ok_or_else(|| format!("{text:?} is outside the column's range")),
    )
}

#[async_trait]
impl Contract for Sample {
    const KIND: &'static str = "sample";
    type Payload = SamplePayload;
    /// Not yet typed: `rows`, `seed`, `groups`, `timings`, `artifacts`, `outputs.dataset_id`,
    /// `model`.
    type Output = SampleOutput;

    fn check(&self, payload: &SamplePayload) -> Result<(), Vec<FieldError>> {
        payload.check()
    }

    async fn preflight(
        &self,
        context: &Context,
        tenant: Uuid,
        payload: &SamplePayload,
    ) -> Result<(), Refusal> {
        let model = shared::saved_models::get(&context.pool, tenant, payload.model_id)
            .await?
            .ok_or_else(|| Refusal::Unknown("model".into()))?;
        let mut errors = Vec::new();
        for (field, conditions, _) in payload.groups() {
            if errors.len() >= shared::problem::MAX_FIELD_ERRORS {
                break;
            }
            for (name, value) in &conditions {
                let problem = match model.schema.iter().find(|c| c.name == *name) {
                    None => Some(format!("the model has no column {name:?}")),
                    Some(column) => refusal(column, value),
                };
                if let Some(problem) = problem {
                    errors.push(FieldError::new(format!("payload.{field}.{name}"), problem));
                }
            }
        }
        if let Some(why) = crate::synthesis::output_too_large(
            payload.total_rows().max(0) as u64,
            crate::synthesis::row_bytes(model.schema.len(), []),
            context.max_in_memory_bytes,
        ) {
            errors.push(FieldError::new("payload.rows", why));
        }
        crate::refused(errors).map_err(Refusal::Invalid)
    }
}

/// A sample's result.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SampleOutput {
    pub rows: usize,
    /// The seed the rows were drawn with (the job id's when none was given).
    pub seed: u64,
    /// Each condition group and its rows, in the order they were drawn.
    pub groups: Vec<SampledGroup>,
    pub timings: SampleTimings,
    pub artifacts: Vec<crate::Artifact>,
    pub outputs: SampleOutputs,
    pub model: ModelRef,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SampledGroup {
    #[schema(value_type = Object)]
    pub conditions: ConditionMap,
    pub rows: i64,
}

/// The sampling apart from writing the file.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SampleTimings {
    pub sample_seconds: f64,
    pub write_seconds: f64,
    pub rows_per_second: f64,
    pub threads: usize,
}

/// The sampled table, registered as a dataset of the tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SampleOutputs {
    pub dataset_id: Uuid,
}

/// The saved model the rows came from.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelRef {
    pub id: Uuid,
    pub name: String,
    pub version: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_payload;
    use serde_json::json;

    fn fields(payload: Value) -> Vec<String> {
        let mut base = json!({"model_id": Uuid::nil()});
        base.as_object_mut()
            .unwrap()
            .extend(payload.as_object().unwrap().clone());
        match parse_payload::<SamplePayload>(&base).and_then(|p| p.check()) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn validation_names_each_bad_field() {
        assert!(fields(json!({"rows": 10})).is_empty());
        assert!(
            fields(json!({"rows": 10, "conditions": {"city": "X"}, "format": "csv"})).is_empty()
        );
        assert_eq!(fields(json!({})), ["payload.rows"]);
        assert_eq!(fields(json!({"rows": 0})), ["payload.rows"]);
        assert_eq!(
            fields(json!({"rows": MAX_SAMPLE_ROWS + 1})),
            ["payload.rows"]
        );
        assert_eq!(
            fields(json!({"rows": 5, "format": "xlsx"})),
            ["payload.format"]
        );
        assert_eq!(
            fields(json!({"rows": 5, "conditions": {"city": ["X"]}})),
            ["payload.conditions.city"]
        );
        let groups = json!([{"conditions": {"a": 1}, "rows": 3}, {"conditions": {}, "rows": 4}]);
        assert!(fields(json!({"conditions": groups})).is_empty());
        assert!(fields(json!({"rows": 7, "conditions": groups})).is_empty());
        assert_eq!(
            fields(json!({"rows": 8, "conditions": groups})),
            ["payload.rows"]
        );
        assert_eq!(
            fields(json!({"conditions": [{"conditions": {"a": 1}, "rows": 0}]})),
            ["payload.conditions[0].rows"]
        );
        assert_eq!(fields(json!({"conditions": []})), ["payload.conditions"]);
        assert_eq!(fields(json!({"rows": 1, "wibble": 1})), ["payload.wibble"]);
        // Two groups of the largest rows: their sum overflowed (a panic in a debug build).
        let huge =
            json!([{"conditions": {}, "rows": i64::MAX}, {"conditions": {}, "rows": i64::MAX}]);
        assert!(fields(json!({"conditions": huge})).contains(&"payload.conditions".to_owned()));
    }

    #[test]
    fn a_condition_must_name_a_value_the_model_can_generate() {
        let column = |role: &str, levels: Option<Vec<Value>>| ModelColumn {
            name: "c".into(),
            data_type: "str".into(),
            role: role.into(),
            levels,
            more_levels: false,
        };
        let city = column(
            "categorical",
            Some(vec![json!("X"), json!("Y"), Value::Null]),
        );
        assert_eq!(refusal(&city, &json!("X")), None);
        assert_eq!(refusal(&city, &Value::Null), None);
        assert!(refusal(&city, &json!("Z"))
            .unwrap()
            .contains("never generates \"Z\""));
        // A refusal's text is bounded whatever the levels are: 20 of a megabyte each made
        // 20 MB a group, 2 GB for one job's 100 groups.
        let long = column("categorical", Some(vec![json!("x".repeat(1 << 20)); 20]));
        let refused = refusal(&long, &json!(0)).unwrap();
        assert!(refused.len() < 2048, "{} bytes", refused.len());
        // A partial list leaves an unlisted value to the job, which knows every level.
        let partial = ModelColumn {
            more_levels: true,
            ..column("categorical", Some(vec![json!("X")]))
        };
        assert_eq!(refusal(&partial, &json!("Z")), None);
        let flag = column("categorical", Some(vec![json!("true"), json!("false")]));
        assert_eq!(refusal(&flag, &json!(true)), None);
        let small = column("numerical", Some(vec![json!(1.0), json!(2.0)]));
        assert_eq!(refusal(&small, &json!(2)), None);
        assert!(refusal(&small, &json!(3)).is_some());
        let amount = column("numerical", None);
        assert_eq!(refusal(&amount, &json!(3.5)), None);
        assert!(refusal(&amount, &json!("3.5")).is_some());
        assert!(refusal(&column("identifier", None), &json!(1)).is_some());
    }

    #[test]
    fn dates_and_datetimes_are_asked_as_text_and_read_as_the_numbers_learned() {
        let at = |data_type: &str, value: Value| temporal(data_type, &value);
        assert_eq!(at("date", json!("1970-01-11")), Some(Ok(10.0)));
        assert_eq!(at("date", json!("2024-03-05")), Some(Ok(19787.0)));
        let ten_thirty = 19787.0 * 86_400.0 + 37_800.0;
        assert_eq!(
            at("datetime[μs, UTC]", json!("2024-03-05T11:30:00+01:00")),
            Some(Ok(ten_thirty * 1e6))
        );
        assert_eq!(
            at("datetime[ms]", json!("2024-03-05 10:30:00")),
            Some(Ok(ten_thirty * 1e3))
        );
        assert!(
            matches!(at("date", json!("2024-13-45")), Some(Err(m)) if m.contains("YYYY-MM-DD"))
        );
        assert!(
            matches!(at("datetime[ns]", json!("soon")), Some(Err(m)) if m.contains("RFC 3339"))
        );
        assert!(matches!(at("date", json!(19787)), Some(Err(_))));
        assert_eq!(
            at("date", Value::Null),
            None,
            "null asks for a missing value"
        );
        assert_eq!(
            at("datetime[ms]", json!("1969-12-31T23:59:59.999Z")),
            Some(Ok(-1.0))
        );
        assert_eq!(
            at("datetime[μs]", json!("1500-01-01T00:00:00Z")),
            Some(Ok(-14_831_769_600.0 * 1e6))
        );
        assert!(matches!(
            at("datetime[ms]", json!("2024-03-05T10:30:00.0005Z")),
            Some(Err(m)) if m.contains("finer")
        ));
        assert_eq!(at("time", json!("10:30:00")), None);
        assert_eq!(at("f64", json!("2024-03-05")), None);

        let column = |data_type: &str| ModelColumn {
            name: "day".into(),
            data_type: data_type.into(),
            role: "datetime".into(),
            levels: None,
            more_levels: false,
        };
        assert_eq!(refusal(&column("date"), &json!("2024-03-05")), None);
        assert!(refusal(&column("date"), &json!("05/03/2024")).is_some());
        assert!(refusal(&column("time"), &json!("10:30")).is_some());
        // A date column the tenant declared categorical or numerical is still asked as text.
        let numerical = ModelColumn {
            role: "numerical".into(),
            ..column("date")
        };
        assert_eq!(refusal(&numerical, &json!("2024-03-05")), None);

        // Few-valued dates show their levels as dates, and are asked as dates.
        assert_eq!(
            temporal_text("date", 19787.0).as_deref(),
            Some("2024-03-05")
        );
        let micros = at("datetime[μs, UTC]", json!("2024-03-05T10:30:00.25Z"));
        let text = temporal_text("datetime[μs, UTC]", micros.unwrap().unwrap());
        assert_eq!(text.as_deref(), Some("2024-03-05T10:30:00.250Z"));
        assert_eq!(temporal_text("f64", 1.0), None);
        let weekly = ModelColumn {
            levels: Some(vec![json!("2024-03-05"), json!("2024-03-12")]),
            ..column("date")
        };
        assert_eq!(refusal(&weekly, &json!("2024-03-12")), None);
        assert!(refusal(&weekly, &json!("2024-03-13")).is_some());
        let saved_before = ModelColumn {
            levels: Some(vec![json!(19787), json!(19794)]),
            ..column("date")
        };
        assert_eq!(refusal(&saved_before, &json!("2024-03-12")), None);
    }
}
