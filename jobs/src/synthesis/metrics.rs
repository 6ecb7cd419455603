//! Evaluation. Quality as SDMetrics' single-table Quality Report computes it: column shapes
//! (KS complement for numbers and datetimes, TV complement for categoricals, missing values
//! dropped), column pair trends (correlation similarity 1 − |r − r'|/2 for two continuous
//! columns over complete rows; otherwise contingency similarity 1 − TVD of the joint
//! frequencies, continuous columns cut into 10 equal-width bins of each table's own range,
//! missing values kept), overall = mean of the two averages. Like SDMetrics (0.2x–0.3x), the
//! pair average counts only pairs related in the real data: |r| > 0.5, or Cramér's V > 0.3;
//! the mean over every pair is reported beside it. Privacy: distance to closest record and
//! the exact-match rate.

use rand::{rngs::StdRng, seq::index::sample};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

use super::{
    profile::Role,
    stats::pearson,
    table::{Table, Values},
};

/// Bins a continuous column is cut into for contingency similarity.
const BINS: usize = 10;
/// A continuous pair counts in the pair average when its real |correlation| exceeds this...
const REAL_CORRELATION_THRESHOLD: f64 = 0.5;
/// ...any other pair when its real Cramér's V does.
const REAL_ASSOCIATION_THRESHOLD: f64 = 0.3;
/// Rows of synthetic and holdout data whose distance to the training data is measured.
const DCR_ROWS: usize = 1000;
/// Training rows searched for the closest record.
const DCR_REFERENCE: usize = 20_000;

#[derive(Clone, Debug, Serialize)]
pub struct ColumnScore {
    pub column: String,
    pub metric: &'static str,
    pub score: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PairScore {
    pub columns: [String; 2],
    pub metric: &'static str,
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real_correlation: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthetic_correlation: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real_association: Option<f64>,
    /// Related enough in the real data to count in `column_pair_trends`.
    pub meets_threshold: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Quality {
    pub overall: f64,
    pub column_shapes: f64,
    /// Over the pairs that meet the threshold (1 when none does, and then `overall` is the
    /// shapes alone).
    pub column_pair_trends: f64,
    /// Over every pair.
    pub column_pair_trends_all_pairs: f64,
    pub shapes: Vec<ColumnScore>,
    pub pairs: Vec<PairScore>,
}

/// How a learned column is compared.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    Continuous,
    Discrete,
}

fn shape(role: Role) -> Option<Shape> {
    match role {
        Role::Numerical | Role::Datetime => Some(Shape::Continuous),
        Role::Categorical => Some(Shape::Discrete),
        Role::Identifier | Role::Skip => None,
    }
}

/// Each row's key in a dictionary shared by both tables (missing has its own key).
fn codes(real: &Values, synthetic: &Values) -> (Vec<u64>, Vec<u64>) {
    let mut dictionary: HashMap<Option<String>, u64> = HashMap::new();
    let mut encode = |values: &Values| -> Vec<u64> {
        let keys: Vec<Option<String>> = match values {
            Values::Numbers(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
            Values::Labels(v) => v.clone(),
        };
        keys.into_iter()
            .map(|k| {
                let next = dictionary.len() as u64;
                *dictionary.entry(k).or_insert(next)
            })
            .collect()
    };
    let real = encode(real);
    (real, encode(synthetic))
}

fn numbers(values: &Values) -> &[Option<f64>] {
    match values {
        Values::Numbers(v) => v,
        Values::Labels(_) => &[],
    }
}

/// 1 − the two-sample Kolmogorov–Smirnov statistic over present values.
pub fn ks_complement(real: &[Option<f64>], synthetic: &[Option<f64>]) -> Option<f64> {
    // Only numbers: a NaN is below nothing, and the walk below would never pass it.
    let sorted = |v: &[Option<f64>]| {
        let mut s: Vec<f64> = v
            .iter()
            .flatten()
            .copied()
            .filter(|x| !x.is_nan())
            .collect();
        s.sort_by(f64::total_cmp);
        s
    };
    let (a, b) = (sorted(real), sorted(synthetic));
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let v = a[i].min(b[j]);
        while i < a.len() && a[i] <= v {
            i += 1;
        }
        while j < b.len() && b[j] <= v {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    Some(1.0 - d)
}

/// 1 − the total variation distance between the frequencies of the present keys.
pub fn tv_complement(real: &[Option<u64>], synthetic: &[Option<u64>]) -> Option<f64> {
    let frequencies = |v: &[Option<u64>]| {
        let present: Vec<u64> = v.iter().flatten().copied().collect();
        let mut f: BTreeMap<u64, f64> = BTreeMap::new();
        for k in &present {
            *f.entry(*k).or_default() += 1.0 / present.len() as f64;
        }
        f
    };
    let (p, q) = (frequencies(real), frequencies(synthetic));
    if p.is_empty() || q.is_empty() {
        return None;
    }
    Some(1.0 - total_variation(&p, &q))
}

/// Half the L1 distance; ordered maps keep the float sums, and so the report, reproducible.
fn total_variation<K: Ord>(p: &BTreeMap<K, f64>, q: &BTreeMap<K, f64>) -> f64 {
    let mut sum: f64 = p
        .iter()
        .map(|(k, a)| (a - q.get(k).copied().unwrap_or(0.0)).abs())
        .sum();
    sum += q
        .iter()
        .filter(|(k, _)| !p.contains_key(*k))
        .map(|(_, b)| b)
        .sum::<f64>();
    0.5 * sum
}

/// numpy's `digitize(x, histogram_bin_edges(present x))`: bins 1..=10 of the column's own
/// range, the maximum and missing values in bin 11.
fn discretize(values: &[Option<f64>]) -> Vec<u64> {
    let present = values.iter().flatten();
    let lo = present.clone().fold(f64::INFINITY, |a, &b| a.min(b));
    let hi = present.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let (lo, hi) = if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let edges: Vec<f64> = (0..=BINS)
        .map(|i| lo + (hi - lo) * i as f64 / BINS as f64)
        .collect();
    values
        .iter()
        .map(|v| match v {
            Some(v) => edges.partition_point(|&e| e <= *v) as u64,
            None => edges.len() as u64,
        })
        .collect()
}

fn joint(a: &[u64], b: &[u64]) -> BTreeMap<(u64, u64), f64> {
    let mut f: BTreeMap<(u64, u64), f64> = BTreeMap::new();
    for (x, y) in a.iter().zip(b) {
        *f.entry((*x, *y)).or_default() += 1.0 / a.len() as f64;
    }
    f
}

/// 1 − the TVD of the joint frequencies; `None` (no score) when the real pair has fewer than
/// two levels on a side. Also the real pair's Cramér's V.
fn contingency_similarity(
    real: (&[u64], &[u64]),
    synthetic: (&[u64], &[u64]),
) -> Option<(f64, f64)> {
    let p = joint(real.0, real.1);
    let association = cramers_v(&p)?;
    let score = 1.0 - total_variation(&p, &joint(synthetic.0, synthetic.1));
    Some((score, association))
}

/// Cramér's V of a joint distribution (χ² without continuity correction, as scipy's
/// `association`).
fn cramers_v(joint: &BTreeMap<(u64, u64), f64>) -> Option<f64> {
    let mut rows: BTreeMap<u64, f64> = BTreeMap::new();
    let mut columns: BTreeMap<u64, f64> = BTreeMap::new();
    for (&(a, b), &p) in joint {
        *rows.entry(a).or_default() += p;
        *columns.entry(b).or_default() += p;
    }
    let smaller = rows.len().min(columns.len());
    if smaller < 2 {
        return None;
    }
    // χ²/n over every cell, Σ (o - e)² / e, is Σ o² / e - 1 (the o and the e each sum to 1):
    // a sum over the observed cells alone. Over every cell it took hours for two columns of
    // 45,000 categories each (a few megabytes of upload).
    let mut phi2 = -1.0;
    for (&(a, b), &observed) in joint {
        phi2 += observed * observed / (rows[&a] * columns[&b]);
    }
    Some((phi2.max(0.0) / (smaller - 1) as f64).sqrt())
}

/// The Quality Report of `synthetic` against `real`, over the columns with a learned role;
/// None once `stop` says so (asked between columns: the pairs of 500 columns over a million
/// rows take minutes, and a cancel waited for them).
pub fn quality(
    real: &Table,
    synthetic: &Table,
    roles: &[(String, Role)],
    stop: &dyn Fn() -> bool,
) -> Option<Quality> {
    struct Prepared<'a> {
        name: &'a str,
        shape: Shape,
        real: &'a Values,
        synthetic: &'a Values,
        /// Discrete: shared codes; continuous: own-range bins.
        real_keys: Vec<u64>,
        synthetic_keys: Vec<u64>,
    }
    let mut columns = Vec::new();
    for (name, role) in roles {
        let (Some(shape), Some(a), Some(b)) =
            (shape(*role), real.column(name), synthetic.column(name))
        else {
            continue;
        };
        let continuous = shape == Shape::Continuous
            && matches!(
                (&a.values, &b.values),
                (Values::Numbers(_), Values::Numbers(_))
            );
        let (real_keys, synthetic_keys) = if continuous {
            (
                discretize(numbers(&a.values)),
                discretize(numbers(&b.values)),
            )
        } else {
            codes(&a.values, &b.values)
        };
        columns.push(Prepared {
            name,
            shape: if continuous {
                Shape::Continuous
            } else {
                Shape::Discrete
            },
            real: &a.values,
            synthetic: &b.values,
            real_keys,
            synthetic_keys,
        });
    }

    let mut shapes = Vec::new();
    for c in &columns {
        let (metric, score) = match c.shape {
            Shape::Continuous => (
                "KSComplement",
                ks_complement(numbers(c.real), numbers(c.synthetic)),
            ),
            Shape::Discrete => {
                let present = |keys: &[u64], values: &Values| -> Vec<Option<u64>> {
                    let missing = missing_mask(values);
                    keys.iter()
                        .zip(missing)
                        .map(|(k, m)| (!m).then_some(*k))
                        .collect()
                };
                (
                    "TVComplement",
                    tv_complement(
                        &present(&c.real_keys, c.real),
                        &present(&c.synthetic_keys, c.synthetic),
                    ),
                )
            }
        };
        if let Some(score) = score {
            shapes.push(ColumnScore {
                column: c.name.to_owned(),
                metric,
                score,
            });
        }
    }

    let mut pairs = Vec::new();
    for (i, a) in columns.iter().enumerate() {
        if stop() {
            return None;
        }
        for b in &columns[i + 1..] {
            let columns = [a.name.to_owned(), b.name.to_owned()];
            if a.shape == Shape::Continuous && b.shape == Shape::Continuous {
                let real = pearson(numbers(a.real), numbers(b.real));
                let synthetic = pearson(numbers(a.synthetic), numbers(b.synthetic));
                if let (Some(r), Some(s)) = (real, synthetic) {
                    pairs.push(PairScore {
                        columns,
                        metric: "CorrelationSimilarity",
                        score: 1.0 - (r - s).abs() / 2.0,
                        real_correlation: Some(r),
                        synthetic_correlation: Some(s),
                        real_association: None,
                        meets_threshold: r.abs() > REAL_CORRELATION_THRESHOLD,
                    });
                }
            } else if let Some((score, association)) = contingency_similarity(
                (&a.real_keys, &b.real_keys),
                (&a.synthetic_keys, &b.synthetic_keys),
            ) {
                pairs.push(PairScore {
                    columns,
                    metric: "ContingencySimilarity",
                    score,
                    real_correlation: None,
                    synthetic_correlation: None,
                    real_association: Some(association),
                    meets_threshold: association > REAL_ASSOCIATION_THRESHOLD,
                });
            }
        }
    }
    let mean = |scores: &mut dyn Iterator<Item = f64>| {
        let (sum, n) = scores.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
        (n > 0).then(|| sum / n as f64)
    };
    let column_shapes = mean(&mut shapes.iter().map(|s| s.score));
    let column_pair_trends = mean(&mut pairs.iter().filter(|p| p.meets_threshold).map(|p| p.score));
    let all_pairs = mean(&mut pairs.iter().map(|p| p.score));
    let overall = match (column_shapes, column_pair_trends) {
        (Some(a), Some(b)) => (a + b) / 2.0,
        (Some(a), None) => a,
        _ => 0.0,
    };
    Some(Quality {
        overall,
        column_shapes: column_shapes.unwrap_or(0.0),
        column_pair_trends: column_pair_trends.unwrap_or(1.0),
        column_pair_trends_all_pairs: all_pairs.unwrap_or(1.0),
        shapes,
        pairs,
    })
}

fn missing_mask(values: &Values) -> Vec<bool> {
    match values {
        Values::Numbers(v) => v.iter().map(Option::is_none).collect(),
        Values::Labels(v) => v.iter().map(Option::is_none).collect(),
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Distances {
    pub median: f64,
    pub p05: f64,
    pub rows: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Privacy {
    /// Distance to the closest training record (mean over columns of the range-scaled
    /// absolute difference for numbers, 0/1 for labels) of synthetic rows...
    pub dcr_synthetic_to_train: Option<Distances>,
    /// ...and, as the baseline, of real rows the synthesizer never saw.
    pub dcr_holdout_to_train: Option<Distances>,
    /// Synthetic rows equal to a training row on every learned column.
    pub exact_match_rate: f64,
    pub membership_inference: Option<MembershipInference>,
    pub epsilon_spent: Option<f64>,
}

/// A distance-based membership attack: it calls a real row a member of the training set
/// when the synthetic table holds a close copy of it, and is scored on training rows
/// (members) against holdout rows (non-members), as SDMetrics' DCR-based tests do.
#[derive(Clone, Debug, Serialize)]
pub struct MembershipInference {
    /// Chance that a member sits closer to the synthetic rows than a non-member (ties count
    /// half): 0.5 when the output tells nothing of who trained it.
    pub auc: f64,
    /// The attack's edge over a coin toss, max(0, 2·AUC − 1).
    pub advantage: f64,
    pub members: usize,
    pub non_members: usize,
}

/// Distances to closest record and exact matches of `synthetic` (and `holdout`) to `train`.
pub fn privacy(
    train: &Table,
    holdout: &Table,
    synthetic: &Table,
    roles: &[(String, Role)],
    epsilon_spent: Option<f64>,
    rng: &mut StdRng,
) -> Privacy {
    let learned: Vec<&str> = roles
        .iter()
        .filter(|(_, role)| role.is_learned())
        .map(|(name, _)| name.as_str())
        .collect();
    let encode = |table: &Table| -> Vec<Vec<Cell>> {
        let columns: Vec<&Values> = learned
            .iter()
            .filter_map(|name| table.column(name).map(|c| &c.values))
            .collect();
        (0..table.rows())
            .map(|row| columns.iter().map(|values| cell(values, row)).collect())
            .collect()
    };
    let (train_rows, holdout_rows, synthetic_rows) =
        (encode(train), encode(holdout), encode(synthetic));

    let known: HashSet<&[Cell]> = train_rows.iter().map(Vec::as_slice).collect();
    let matches = synthetic_rows
        .iter()
        .filter(|row| known.contains(row.as_slice()))
        .count();

    let ranges: Vec<Option<f64>> = (0..learned.len())
        .map(|c| {
            let numbers = train_rows.iter().filter_map(|row| match row[c] {
                Cell::Number(bits) => Some(f64::from_bits(bits)),
                _ => None,
            });
            let (lo, hi) = numbers.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
            (hi > lo).then_some(hi - lo)
        })
        .collect();
    // Each probe's distance to the closest of `targets` (up to DCR_ROWS probes of `rows`).
    let closest_to = |targets: &[&[Cell]], rows: &[Vec<Cell>], rng: &mut StdRng| -> Vec<f64> {
        pick(rows, DCR_ROWS, rng)
            .iter()
            .map(|probe| {
                targets
                    .iter()
                    .map(|other| distance(probe, other, &ranges))
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    };
    let reference = pick(&train_rows, DCR_REFERENCE, rng);
    let dcr = |rows: &[Vec<Cell>], rng: &mut StdRng| -> Option<Distances> {
        if reference.is_empty() {
            return None;
        }
        let mut closest = closest_to(&reference, rows, rng);
        if closest.is_empty() {
            return None;
        }
        closest.sort_by(f64::total_cmp);
        Some(Distances {
            median: super::profile::quantile(&closest, 0.5),
            p05: super::profile::quantile(&closest, 0.05),
            rows: closest.len(),
        })
    };
    let targets = pick(&synthetic_rows, DCR_REFERENCE, rng);
    let members = closest_to(&targets, &train_rows, rng);
    let non_members = closest_to(&targets, &holdout_rows, rng);
    let membership_inference = (!members.is_empty() && !non_members.is_empty()).then(|| {
        let wins: f64 = members
            .iter()
            .map(|m| {
                non_members
                    .iter()
                    .map(|h| match m.total_cmp(h) {
                        std::cmp::Ordering::Less => 1.0,
                        std::cmp::Ordering::Equal => 0.5,
                        std::cmp::Ordering::Greater => 0.0,
                    })
                    .sum::<f64>()
            })
            .sum();
        let auc = wins / (members.len() * non_members.len()) as f64;
        MembershipInference {
            auc,
            advantage: (2.0 * auc - 1.0).max(0.0),
            members: members.len(),
            non_members: non_members.len(),
        }
    });
    Privacy {
        membership_inference,
        dcr_synthetic_to_train: dcr(&synthetic_rows, rng),
        dcr_holdout_to_train: dcr(&holdout_rows, rng),
        exact_match_rate: if synthetic_rows.is_empty() {
            0.0
        } else {
            matches as f64 / synthetic_rows.len() as f64
        },
        epsilon_spent,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Cell {
    Missing,
    Number(u64),
    Label(String),
}

fn cell(values: &Values, row: usize) -> Cell {
    match values {
        Values::Numbers(v) => v[row].map_or(Cell::Missing, |x| Cell::Number(x.to_bits())),
        Values::Labels(v) => v[row].clone().map_or(Cell::Missing, Cell::Label),
    }
}

fn distance(a: &[Cell], b: &[Cell], ranges: &[Option<f64>]) -> f64 {
    let total: f64 = a
        .iter()
        .zip(b)
        .zip(ranges)
        .map(|((x, y), range)| match (x, y) {
            (Cell::Number(x), Cell::Number(y)) => match range {
                Some(r) => ((f64::from_bits(*x) - f64::from_bits(*y)).abs() / r).min(1.0),
                None => f64::from(x != y),
            },
            (x, y) => f64::from(x != y),
        })
        .sum();
    total / a.len().max(1) as f64
}

/// Up to `limit` of `rows`, chosen at random (all of them, in order, when fewer).
fn pick<'a>(rows: &'a [Vec<Cell>], limit: usize, rng: &mut StdRng) -> Vec<&'a [Cell]> {
    if rows.len() <= limit {
        return rows.iter().map(Vec::as_slice).collect();
    }
    let mut chosen = sample(rng, rows.len(), limit).into_vec();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| rows[i].as_slice()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthesis::table::Column;
    use polars::prelude::DataType;
    use rand::SeedableRng;

    fn nums(v: &[f64]) -> Vec<Option<f64>> {
        v.iter().map(|x| Some(*x)).collect()
    }

    #[test]
    fn ks_complement_is_one_minus_the_largest_cdf_gap() {
        let a = nums(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(ks_complement(&a, &a), Some(1.0));
        // b's CDF is ahead by half at 2: F_a(2) = 0.5, F_b(2) = 1.
        let b = nums(&[1.0, 1.0, 2.0, 2.0]);
        assert_eq!(ks_complement(&a, &b), Some(0.5));
        let disjoint = nums(&[10.0, 11.0]);
        assert_eq!(ks_complement(&a, &disjoint), Some(0.0));
        assert_eq!(ks_complement(&a, &[None]), None);
    }

    #[test]
    fn tv_complement_ignores_missing_values() {
        let real = [Some(1), Some(1), Some(2), None];
        let synthetic = [Some(1), Some(2), Some(2), Some(3)];
        // real: 2/3, 1/3; synthetic: 1/4, 1/2, 1/4 → TVD = (5/12 + 1/6 + 1/4)/2 = 5/12.
        let score = tv_complement(&real, &synthetic).unwrap();
        assert!((score - 7.0 / 12.0).abs() < 1e-12, "{score}");
    }

    #[test]
    fn discretize_follows_numpy_digitize() {
        let bins = discretize(&[Some(0.0), Some(0.95), Some(5.0), Some(10.0), None]);
        assert_eq!(bins, [1, 1, 6, 11, 11]);
        assert_eq!(discretize(&[Some(3.0), Some(3.0)]), [6, 6]);
    }

    fn table(x: Vec<Option<f64>>, y: Vec<Option<f64>>, c: Vec<&str>) -> Table {
        Table {
            columns: vec![
                Column::numbers("x", DataType::Float64, x),
                Column::numbers("y", DataType::Float64, y),
                Column::labels("c", c.into_iter().map(|s| Some(s.to_owned())).collect()),
            ],
        }
    }

    fn roles() -> Vec<(String, Role)> {
        vec![
            ("x".into(), Role::Numerical),
            ("y".into(), Role::Numerical),
            ("c".into(), Role::Categorical),
        ]
    }

    #[test]
    fn identical_tables_score_one_and_anti_correlation_scores_low() {
        let x = nums(&(0..100).map(f64::from).collect::<Vec<_>>());
        let y = nums(&(0..100).map(|i| f64::from(i) * 2.0).collect::<Vec<_>>());
        let c: Vec<&str> = (0..100).map(|i| if i < 50 { "a" } else { "b" }).collect();
        let real = table(x.clone(), y.clone(), c.clone());
        let same = quality(&real, &real, &roles(), &|| false).unwrap();
        assert_eq!(same.overall, 1.0);
        assert_eq!((same.shapes.len(), same.pairs.len()), (3, 3));

        // Same marginals, y reversed: correlation −1 instead of 1, c flipped against x.
        let mut y_rev = y.clone();
        y_rev.reverse();
        let mut c_rev = c.clone();
        c_rev.reverse();
        let flipped = quality(&real, &table(x, y_rev, c_rev), &roles(), &|| false).unwrap();
        assert_eq!(flipped.column_shapes, 1.0);
        let xy = &flipped.pairs[0];
        assert_eq!(xy.metric, "CorrelationSimilarity");
        assert!(xy.score.abs() < 1e-12, "{xy:?}");
        let xc = &flipped.pairs[1];
        assert_eq!(xc.metric, "ContingencySimilarity");
        assert!(xc.score < 0.1, "{xc:?}");
        assert!(flipped.overall < 0.7);
    }

    #[test]
    fn cramers_v_of_many_categories_reads_only_the_observed_cells() {
        // 100,000 rows, 50,000 categories a side, each pair seen twice: 2.5·10^9 cells (about
        // a minute), 5·10^4 seen.
        let a: Vec<u64> = (0..100_000).map(|i| i / 2).collect();
        let b: Vec<u64> = (0..100_000).map(|i| (i / 2 * 7) % 50_000).collect();
        let started = std::time::Instant::now();
        let v = cramers_v(&joint(&a, &b)).unwrap();
        assert!((v - 1.0).abs() < 1e-9, "{v}");
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    }

    #[test]
    fn cramers_v_is_one_for_a_function_and_zero_for_independence() {
        let same = joint(&[0, 1, 2, 0, 1, 2], &[5, 6, 7, 5, 6, 7]);
        assert!((cramers_v(&same).unwrap() - 1.0).abs() < 1e-12);
        let independent = joint(&[0, 0, 1, 1], &[0, 1, 0, 1]);
        assert!(cramers_v(&independent).unwrap().abs() < 1e-12);
        assert_eq!(cramers_v(&joint(&[0, 0], &[1, 2])), None);
    }

    #[test]
    fn weakly_related_pairs_do_not_count() {
        // x and y independent-ish (|r| < 0.5): scored but left out of the pair average.
        let x = nums(&(0..40).map(f64::from).collect::<Vec<_>>());
        let y = nums(
            &(0..40)
                .map(|i| f64::from((i * 17) % 40))
                .collect::<Vec<_>>(),
        );
        let c: Vec<&str> = (0..40)
            .map(|i| if i % 2 == 0 { "a" } else { "b" })
            .collect();
        let real = table(x.clone(), y.clone(), c.clone());
        let q = quality(&real, &real, &roles(), &|| false).unwrap();
        assert!(q.pairs.iter().all(|p| !p.meets_threshold), "{:?}", q.pairs);
        assert_eq!(q.overall, q.column_shapes);
    }

    #[test]
    fn exact_matches_and_distances() {
        let real = table(
            nums(&[0.0, 10.0, 20.0, 30.0]),
            nums(&[1.0, 1.0, 1.0, 1.0]),
            vec!["a", "b", "a", "b"],
        );
        let holdout = table(nums(&[5.0]), nums(&[1.0]), vec!["a"]);
        let synthetic = table(nums(&[0.0, 15.0]), nums(&[1.0, 1.0]), vec!["a", "a"]);
        let mut rng = StdRng::seed_from_u64(0);
        let p = privacy(&real, &holdout, &synthetic, &roles(), Some(1.0), &mut rng);
        assert_eq!(p.exact_match_rate, 0.5);
        let syn = p.dcr_synthetic_to_train.unwrap();
        // Row 2 is 5 away from 10 ("b") and 20 ("a"): closest is 20, (5/30)/3.
        assert!(
            (syn.median - (0.0 + 5.0 / 30.0 / 3.0) / 2.0).abs() < 1e-12,
            "{syn:?}"
        );
        let held = p.dcr_holdout_to_train.unwrap();
        assert!((held.median - 5.0 / 30.0 / 3.0).abs() < 1e-12);
        assert_eq!(p.epsilon_spent, Some(1.0));
    }

    #[test]
    fn membership_inference_tells_copies_from_honest_samples() {
        let real = table(
            nums(&[0.0, 10.0, 20.0, 30.0]),
            nums(&[1.0, 2.0, 3.0, 4.0]),
            vec!["a", "b", "a", "b"],
        );
        let holdout = table(nums(&[5.0, 25.0]), nums(&[1.5, 3.5]), vec!["b", "a"]);
        let mut rng = StdRng::seed_from_u64(0);
        // A copy of the training rows: every member is at distance 0, every non-member not.
        let copied = privacy(&real, &holdout, &real, &roles(), None, &mut rng);
        let attack = copied.membership_inference.unwrap();
        assert_eq!((attack.auc, attack.advantage), (1.0, 1.0));
        // Rows as near the holdout as the training set: no edge.
        let fair = table(
            nums(&[2.5, 15.0, 22.5]),
            nums(&[1.25, 2.5, 3.25]),
            vec!["a", "b", "a"],
        );
        let honest = privacy(&real, &holdout, &fair, &roles(), None, &mut rng);
        let attack = honest.membership_inference.unwrap();
        assert!(attack.auc <= 0.75, "{attack:?}");
    }
}
