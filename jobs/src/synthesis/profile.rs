//! Profiling: what each column holds and how the synthesizers treat it. Identifier-like
//! columns (a distinct value on every row) are never learned: they get fresh values.

use polars::prelude::DataType;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

use super::table::{Column, Table, Values};

pub use contracts::synthesis::Role;

/// Rows below which "every value distinct" says little about being an identifier.
const MIN_ROWS_FOR_IDENTIFIER: usize = 10;

/// Share of a text column's values that are distinct from which it is taken for an
/// identifier too: learned as a categorical, nearly each of its values (names, emails, notes
/// unique but for a few repeats) would come out verbatim and be listed in the saved model.
const NEAR_UNIQUE_TEXT: f64 = 0.9;

#[derive(Clone, Debug, Serialize)]
pub struct NumericSummary {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    /// 5th, 25th, 50th, 75th and 95th percentiles.
    pub quantiles: [f64; 5],
}

#[derive(Clone, Debug, Serialize)]
pub struct ColumnProfile {
    pub name: String,
    /// The polars type read from the file.
    pub dtype: String,
    pub role: Role,
    pub missing_rate: f64,
    pub distinct: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub numeric: Option<NumericSummary>,
    /// The most frequent labels with their counts (categorical columns).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(String, usize)>,
}

/// Profiles every column; `overrides` (by column name) win over detection, which finds
/// identifiers (unique on every row) only when `find_identifiers`.
pub fn profile(
    table: &Table,
    overrides: &BTreeMap<String, Role>,
    find_identifiers: bool,
) -> Vec<ColumnProfile> {
    table
        .columns
        .iter()
        .map(|column| {
            profile_column(
                column,
                overrides.get(&column.name).copied(),
                find_identifiers,
            )
        })
        .collect()
}

fn profile_column(column: &Column, role: Option<Role>, find_identifiers: bool) -> ColumnProfile {
    let rows = column.values.len();
    let missing = column.values.missing();
    let present = rows - missing;
    let (distinct, numeric, top) = match &column.values {
        Values::Numbers(values) => {
            let mut sorted: Vec<f64> = values.iter().flatten().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let mut distinct = sorted.clone();
            distinct.dedup();
            (distinct.len(), summarize(&sorted), Vec::new())
        }
        Values::Labels(values) => {
            let counts = label_counts(values);
            let mut top: Vec<(String, usize)> = counts
                .iter()
                .filter_map(|(label, n)| Some(((*label)?.to_owned(), *n)))
                .collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            top.truncate(5);
            let distinct = counts.keys().filter(|k| k.is_some()).count();
            (distinct, None, top)
        }
    };
    let enough = find_identifiers && present >= MIN_ROWS_FOR_IDENTIFIER;
    let unique_per_row = enough && distinct == present;
    let near_unique_text = enough
        && column.dtype == DataType::String
        && distinct as f64 >= NEAR_UNIQUE_TEXT * present as f64;
    let role = role.unwrap_or(if column.dtype.is_temporal() {
        Role::Datetime
    } else if near_unique_text
        || unique_per_row && (column.dtype.is_integer() || column.dtype == DataType::String)
    {
        // Floats are distinct on every row by nature; integers and text that are are keys.
        Role::Identifier
    } else if matches!(column.values, Values::Numbers(_)) {
        Role::Numerical
    } else {
        Role::Categorical
    });
    ColumnProfile {
        name: column.name.clone(),
        dtype: column.dtype.to_string(),
        role,
        missing_rate: if rows == 0 {
            0.0
        } else {
            missing as f64 / rows as f64
        },
        distinct,
        numeric,
        top: if role == Role::Categorical {
            top
        } else {
            Vec::new()
        },
    }
}

/// Count of each label (`None` for missing).
pub fn label_counts(values: &[Option<String>]) -> HashMap<Option<&str>, usize> {
    let mut counts: HashMap<Option<&str>, usize> = HashMap::new();
    for value in values {
        *counts.entry(value.as_deref()).or_default() += 1;
    }
    counts
}

/// The `p`-quantile of sorted values, linearly interpolated (numpy's default).
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    let position = p.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let weight = position - below as f64;
    sorted[below] * (1.0 - weight) + sorted[above] * weight
}

fn summarize(sorted: &[f64]) -> Option<NumericSummary> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as f64;
    let mean = sorted.iter().sum::<f64>() / n;
    let variance = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    Some(NumericSummary {
        min: sorted[0],
        max: sorted[sorted.len() - 1],
        mean,
        std: variance.sqrt(),
        quantiles: [0.05, 0.25, 0.5, 0.75, 0.95].map(|p| quantile(sorted, p)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let n = 50;
        Table {
            columns: vec![
                Column::labels("key", (0..n).map(|i| Some(format!("k{i}"))).collect()),
                Column::numbers(
                    "serial",
                    DataType::Int64,
                    (0..n).map(|i| Some(i as f64)).collect(),
                ),
                Column::numbers(
                    "price",
                    DataType::Float64,
                    (0..n).map(|i| Some(i as f64 * 1.5)).collect(),
                ),
                Column::numbers(
                    "count",
                    DataType::Int64,
                    (0..n)
                        .map(|i| (i % 10 != 0).then_some((i % 4) as f64))
                        .collect(),
                ),
                Column::labels(
                    "color",
                    (0..n)
                        .map(|i| Some(["red", "blue", "red"][i % 3].to_owned()))
                        .collect(),
                ),
                Column::numbers(
                    "day",
                    DataType::Date,
                    (0..n).map(|i| Some(i as f64)).collect(),
                ),
            ],
        }
    }

    #[test]
    fn detects_roles_missing_rates_and_shapes() {
        let profiles = profile(&table(), &BTreeMap::new(), true);
        let role = |name: &str| profiles.iter().find(|p| p.name == name).unwrap().role;
        assert_eq!(role("key"), Role::Identifier);
        assert_eq!(role("serial"), Role::Identifier);
        assert_eq!(
            role("price"),
            Role::Numerical,
            "floats are never identifiers"
        );
        assert_eq!(role("count"), Role::Numerical);
        assert_eq!(role("color"), Role::Categorical);
        assert_eq!(role("day"), Role::Datetime, "dates are learned, not keys");

        // Private fits go by the types: keys are learned unless declared identifiers.
        let by_type = profile(&table(), &BTreeMap::new(), false);
        assert_eq!(by_type[0].role, Role::Categorical);
        assert_eq!(by_type[1].role, Role::Numerical);

        let count = &profiles[3];
        assert!((count.missing_rate - 0.1).abs() < 1e-12);
        assert_eq!(count.distinct, 4);
        let summary = count.numeric.as_ref().unwrap();
        assert_eq!((summary.min, summary.max), (0.0, 3.0));
        let color = &profiles[4];
        assert_eq!(color.top[0], ("red".to_owned(), 33));
        assert_eq!(color.distinct, 2);
    }

    /// Text unique but for a few repeats was learned as a categorical whose levels (every
    /// value but one) were sampled verbatim and listed in the saved model.
    #[test]
    fn near_unique_text_gets_fresh_values_as_identifiers_do() {
        let text = |name: &str, labels: Vec<String>| Table {
            columns: vec![Column::labels(name, labels.into_iter().map(Some).collect())],
        };
        let role = |table: &Table, find| profile(table, &BTreeMap::new(), find)[0].role;
        // 20 emails, one of them twice: 19 distinct.
        let mut emails: Vec<String> = (0..19).map(|i| format!("person{i}@example.org")).collect();
        emails.push(emails[3].clone());
        assert_eq!(role(&text("email", emails.clone()), true), Role::Identifier);
        // 10 of 20 distinct stays a category; private fits still go by the types.
        let halves: Vec<String> = (0..20).map(|i| format!("level {}", i % 10)).collect();
        assert_eq!(role(&text("level", halves), true), Role::Categorical);
        assert_eq!(role(&text("email", emails), false), Role::Categorical);
    }

    #[test]
    fn overrides_win() {
        let overrides = BTreeMap::from([
            ("serial".to_owned(), Role::Numerical),
            ("count".to_owned(), Role::Categorical),
            ("color".to_owned(), Role::Skip),
        ]);
        let profiles = profile(&table(), &overrides, true);
        assert_eq!(profiles[1].role, Role::Numerical);
        assert_eq!(profiles[3].role, Role::Categorical);
        assert_eq!(profiles[4].role, Role::Skip);
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let sorted = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&sorted, 0.5), 2.5);
        assert_eq!(quantile(&sorted, 0.0), 1.0);
        assert_eq!(quantile(&sorted, 1.0), 4.0);
        assert!((quantile(&sorted, 0.25) - 1.75).abs() < 1e-12);
    }
}
