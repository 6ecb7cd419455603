//! Constraints: rules every synthetic row keeps. A fixed combination is learned as one joint
//! column, so only combinations the training data holds come out; comparisons are met by
//! rejection: rows are sampled in rounds and those breaking a rule are dropped, which draws
//! exactly the model's distribution given the rules (SDV's reject sampling).

use serde_json::Value;

use super::table::{Column, Table, Values};
use crate::JobError;
pub use contracts::synthesis::Constraint;

/// Sampled columns by name, in the model's order.
pub type Columns = Vec<(String, Values)>;

/// Rejection gives up when fewer sampled rows than this keep the rules.
const LEAST_ACCEPTANCE: f64 = 0.01;
/// Rows drawn before a low acceptance counts: fewer say too little.
const LEAST_DRAWN_TO_JUDGE: usize = 1000;
/// Most rows drawn in one round after the first: a low acceptance makes more rounds, not one
/// round too large for memory.
const MOST_ROWS_PER_ROUND: usize = 1 << 21;

/// The joint column of a fixed combination: its name, and its members in order.
struct Joint {
    name: String,
    members: Vec<String>,
}

fn joints(rules: &[Constraint], table: &Table) -> Vec<Joint> {
    rules
        .iter()
        .filter_map(|rule| match rule {
            Constraint::FixedCombinations { columns } => Some(columns.clone()),
            _ => None,
        })
        .map(|members| {
            // A name no real column has.
            let mut name = format!("({})", members.join(", "));
            while table.column(&name).is_some() {
                name.push('\'');
            }
            Joint { name, members }
        })
        .collect()
}

/// `table` with each fixed combination's columns replaced by one label column (a JSON array
/// per row) where its first member stood.
pub fn combine(table: &Table, rules: &[Constraint]) -> Table {
    let joints = joints(rules, table);
    let mut columns = Vec::new();
    for column in &table.columns {
        match joints.iter().find(|j| j.members.contains(&column.name)) {
            Some(joint) if joint.members[0] == column.name => {
                let members: Vec<&Values> = joint
                    .members
                    .iter()
                    .filter_map(|m| table.column(m).map(|c| &c.values))
                    .collect();
                let keys = (0..table.rows())
                    .map(|row| {
                        let cells: Vec<Value> = members.iter().map(|v| cell(v, row)).collect();
                        Some(Value::Array(cells).to_string())
                    })
                    .collect();
                columns.push(Column::labels(&joint.name, keys));
            }
            Some(_) => {}
            None => columns.push(column.clone()),
        }
    }
    Table { columns }
}

fn cell(values: &Values, row: usize) -> Value {
    match values {
        Values::Numbers(v) => v[row].map_or(Value::Null, Value::from),
        Values::Labels(v) => v[row].clone().map_or(Value::Null, Value::String),
    }
}

/// Splits sampled joint columns (`names` with `values`) back into their members, typed as in
/// `original`.
pub fn separate(
    names: Vec<String>,
    values: Vec<Values>,
    rules: &[Constraint],
    original: &Table,
) -> Columns {
    let joints = joints(rules, original);
    let mut out = Vec::new();
    for (name, values) in names.into_iter().zip(values) {
        let Some(joint) = joints.iter().find(|j| j.name == name) else {
            out.push((name, values));
            continue;
        };
        let Values::Labels(keys) = values else {
            unreachable!("a joint column holds labels")
        };
        let cells: Vec<Vec<Value>> = keys
            .iter()
            .map(|k| {
                k.as_deref()
                    .and_then(|k| serde_json::from_str(k).ok())
                    .unwrap_or_default()
            })
            .collect();
        for (i, member) in joint.members.iter().enumerate() {
            let at = |row: &Vec<Value>| row.get(i).cloned().unwrap_or(Value::Null);
            let values = match original.column(member).map(|c| &c.values) {
                Some(Values::Numbers(_)) => {
                    Values::Numbers(cells.iter().map(|r| at(r).as_f64()).collect())
                }
                _ => Values::Labels(
                    cells
                        .iter()
                        .map(|r| at(r).as_str().map(str::to_owned))
                        .collect(),
                ),
            };
            out.push((member.clone(), values));
        }
    }
    out
}

/// The rows of `columns` that keep every comparison; an error names a rule on a column the
/// model does not learn.
pub fn kept_rows(
    columns: &[(String, Values)],
    rules: &[Constraint],
) -> Result<Vec<usize>, JobError> {
    let numbers = |name: &str| -> Result<&[Option<f64>], JobError> {
        match columns.iter().find(|(n, _)| n == name).map(|c| &c.1) {
            Some(Values::Numbers(v)) => Ok(v),
            Some(Values::Labels(_)) => Err(JobError::Permanent(format!(
                "constraint on {name:?}: it is learned as labels, not numbers"
            ))),
            None => Err(JobError::Permanent(format!(
                "constraint on {name:?}: the column is not learned (an identifier or skipped)"
            ))),
        }
    };
    let rows = columns.first().map_or(0, |c| c.1.len());
    let mut keep = vec![true; rows];
    let mut require = |values: Vec<&[Option<f64>]>, holds: &dyn Fn(&[f64]) -> bool| {
        let mut cells = Vec::with_capacity(values.len());
        for (row, kept) in keep.iter_mut().enumerate() {
            cells.clear();
            cells.extend(values.iter().filter_map(|v| v[row]));
            if cells.len() == values.len() && !holds(&cells) {
                *kept = false;
            }
        }
    };
    for rule in rules {
        match rule {
            Constraint::Inequality { low, high, strict } => {
                let strict = *strict;
                require(vec![numbers(low)?, numbers(high)?], &move |c: &[f64]| {
                    if strict {
                        c[0] < c[1]
                    } else {
                        c[0] <= c[1]
                    }
                })
            }
            Constraint::Range { low, column, high } => require(
                vec![numbers(low)?, numbers(column)?, numbers(high)?],
                &|c: &[f64]| c[0] <= c[1] && c[1] <= c[2],
            ),
            Constraint::Positive { column } => require(vec![numbers(column)?], &|c| c[0] > 0.0),
            Constraint::Negative { column } => require(vec![numbers(column)?], &|c| c[0] < 0.0),
            Constraint::FixedCombinations { .. } => {}
        }
    }
    Ok((0..rows).filter(|&r| keep[r]).collect())
}

/// `rows` rows that keep the rules, drawn from `draw` in rounds sized by the acceptance seen
/// so far; also the first round as drawn (for the quality without the rules).
pub fn sample_kept(
    rows: usize,
    rules: &[Constraint],
    mut draw: impl FnMut(usize) -> Result<Columns, JobError>,
) -> Result<(Columns, Columns), JobError> {
    let first = draw(rows)?;
    let kept = accept_rounds(
        rows,
        first.clone(),
        draw,
        |columns| kept_rows(columns, rules),
        |accepted, drawn| {
            format!(
                "the constraints hold on {accepted} of {drawn} sampled rows: loosen them or \
                 check that the data keeps them"
            )
        },
    )?;
    Ok((kept, first))
}

/// `rows` rows that `accept` keeps, from `first` and then from rounds of `draw` sized by the
/// acceptance seen so far. Fails with `refusal(accepted, drawn)` once enough rows were drawn
/// to tell that fewer than 1 % are accepted.
pub fn accept_rounds(
    rows: usize,
    first: Columns,
    mut draw: impl FnMut(usize) -> Result<Columns, JobError>,
    accept: impl Fn(&Columns) -> Result<Vec<usize>, JobError>,
    refusal: impl Fn(usize, usize) -> String,
) -> Result<Columns, JobError> {
    let good = accept(&first)?;
    let mut drawn = height(&first);
    // Every row kept: the round itself, not a copy.
    let mut kept = if good.len() == drawn && drawn <= rows {
        first
    } else {
        take(&first, &good[..good.len().min(rows)])
    };
    let mut accepted = good.len();
    while height(&kept) < rows {
        let acceptance = accepted as f64 / drawn as f64;
        if drawn >= LEAST_DRAWN_TO_JUDGE && acceptance < LEAST_ACCEPTANCE {
            return Err(JobError::Permanent(refusal(accepted, drawn)));
        }
        let wanted = rows - height(&kept);
        let round = ((wanted as f64 / acceptance.max(LEAST_ACCEPTANCE)) * 1.2).ceil() as usize;
        let round = round.clamp(64, MOST_ROWS_PER_ROUND);
        let batch = draw(round)?;
        let good = accept(&batch)?;
        drawn += round;
        accepted += good.len();
        let good: Vec<usize> = good.into_iter().take(wanted).collect();
        for ((_, all), (_, more)) in kept.iter_mut().zip(take(&batch, &good)) {
            all.append(more);
        }
    }
    Ok(kept)
}

fn height(columns: &[(String, Values)]) -> usize {
    columns.first().map_or(0, |c| c.1.len())
}

fn take(columns: &[(String, Values)], rows: &[usize]) -> Columns {
    columns
        .iter()
        .map(|(name, values)| (name.clone(), values.take(rows)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::DataType;

    fn rule(json: serde_json::Value) -> Constraint {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn combinations_are_learned_as_one_column_and_come_apart_typed() {
        let table = Table {
            columns: vec![
                Column::labels(
                    "city",
                    vec![Some("Lyon".into()), Some("Porto".into()), None],
                ),
                Column::numbers("n", DataType::Int64, vec![Some(1.0), Some(2.0), Some(3.0)]),
                Column::numbers("zone", DataType::Int64, vec![Some(69.0), Some(4.0), None]),
            ],
        };
        let rules = [rule(
            serde_json::json!({"type": "fixed_combinations", "columns": ["city", "zone"]}),
        )];
        let combined = combine(&table, &rules);
        let names: Vec<&str> = combined.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["(city, zone)", "n"]);
        assert_eq!(
            combined.columns[0].values,
            Values::Labels(vec![
                Some(r#"["Lyon",69.0]"#.into()),
                Some(r#"["Porto",4.0]"#.into()),
                Some("[null,null]".into())
            ])
        );
        let back = separate(
            vec!["(city, zone)".into()],
            vec![combined.columns[0].values.clone()],
            &rules,
            &table,
        );
        assert_eq!(back[0], ("city".into(), table.columns[0].values.clone()));
        assert_eq!(back[1], ("zone".into(), table.columns[2].values.clone()));
    }

    #[test]
    fn rejection_keeps_only_rows_that_hold_and_refuses_impossible_rules() {
        let rules = [
            rule(serde_json::json!({"type": "inequality", "low": "in", "high": "out"})),
            rule(serde_json::json!({"type": "positive", "column": "in"})),
        ];
        let mut counter = 0.0;
        let draw = |n: usize| {
            let values: Vec<Option<f64>> = (0..n)
                .map(|_| {
                    counter += 1.0;
                    Some(counter % 10.0 - 2.0)
                })
                .collect();
            let out: Vec<Option<f64>> = values.iter().map(|_| Some(4.0)).collect();
            Ok(vec![
                ("in".to_owned(), Values::Numbers(values)),
                ("out".to_owned(), Values::Numbers(out)),
            ])
        };
        let (kept, first) = sample_kept(500, &rules, draw).unwrap();
        let (Values::Numbers(a), Values::Numbers(b)) = (&kept[0].1, &kept[1].1) else {
            panic!()
        };
        assert_eq!(a.len(), 500);
        assert!(a.iter().zip(b).all(|(x, y)| x.unwrap() > 0.0 && x <= y));
        assert_eq!(first[0].1.len(), 500);

        let never = [rule(
            serde_json::json!({"type": "negative", "column": "out"}),
        )];
        let draw = |n: usize| {
            Ok(vec![(
                "out".to_owned(),
                Values::Numbers(vec![Some(1.0); n]),
            )])
        };
        assert!(matches!(
            sample_kept(10, &never, draw),
            Err(JobError::Permanent(m)) if m.contains("hold on 0 of 1")
        ));
    }
}
