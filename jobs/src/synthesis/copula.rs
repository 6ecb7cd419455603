//! The Gaussian copula: each column's marginal (empirical quantiles for numbers, frequencies
//! for labels and few-valued numbers, the missing rate), and one correlation matrix of the
//! columns' normal scores. Sampling draws correlated normals through the Cholesky factor and
//! maps each back through its column's marginal.
//!
//! With `epsilon`, the fit is differentially private (see `dp` for the mechanism and the
//! neighbouring relation): half the budget buys noisy histograms, split evenly over the
//! columns (a quarter of a numeric column's share buys its bounds unless `min` and `max` are
//! given; label sets not given as `values` keep only levels above a δ threshold), the other
//! half noisy Kendall's tau scores, turned into correlations by ρ = sin(πτ/2). Nothing of
//! the data reaches the model except through those noisy releases.

use rand::{rngs::StdRng, Rng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use super::{
    dp::{self, level_threshold, Epsilon, Noise, Spend},
    profile::{quantile, Role},
    stats::{
        cholesky, interval_mean, kendall_score, nearest_correlation, normal_cdf, pearson,
        standard_normal,
    },
    table::{Column, Values},
};

/// Numbers with at most this many distinct values are sampled as levels, not interpolated.
const MAX_DISCRETE_LEVELS: usize = 32;
/// Quantile knots kept for a continuous marginal.
const KNOTS: usize = 1001;
/// Bins of a DP histogram over a continuous column's bounds.
const DP_BINS: usize = 32;
/// Smallest eigenvalue kept when a correlation matrix is repaired.
const EIGEN_FLOOR: f64 = 1e-6;
/// δ of a private fit whose level sets come from the data (shared by those columns).
const DELTA: f64 = 1e-9;

/// What a learned column needs beyond its values.
#[derive(Clone, Debug)]
pub struct ColumnSpec {
    pub role: Role,
    /// Output is clamped to these; DP histograms span them.
    pub bounds: (Option<f64>, Option<f64>),
    /// The declared level set (public); private fits use it instead of the data's.
    pub levels: Option<Vec<String>>,
}

/// A synthetic number as the column keeps them: rounded to its decimals, clamped to its bounds.
pub(crate) fn finish_number(
    value: f64,
    decimals: Option<u32>,
    (lo, hi): (Option<f64>, Option<f64>),
) -> f64 {
    let rounded = match decimals {
        Some(d) => {
            let scale = 10f64.powi(d as i32);
            (value * scale).round() / scale
        }
        None => value,
    };
    let floored = lo.map_or(rounded, |lo| rounded.max(lo));
    hi.map_or(floored, |hi| floored.min(hi))
}

/// Each column with the role its values suggest and no bounds: what the synthesizers' unit
/// tests fit on.
#[cfg(test)]
pub(crate) fn plain_specs(columns: &[Column]) -> Vec<(&Column, ColumnSpec)> {
    columns
        .iter()
        .map(|c| {
            let role = match c.values {
                Values::Numbers(_) => Role::Numerical,
                Values::Labels(_) => Role::Categorical,
            };
            let spec = ColumnSpec {
                role,
                bounds: (None, None),
                levels: None,
            };
            (c, spec)
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Marginal {
    /// The quantile function at evenly spaced probabilities, linearly interpolated; missing
    /// values drawn independently at their rate.
    Continuous {
        knots: Vec<f64>,
        missing: f64,
        decimals: Option<u32>,
        bounds: (Option<f64>, Option<f64>),
    },
    /// Levels (missing among them) with cumulative probabilities.
    Discrete {
        levels: Values,
        cumulative: Vec<f64>,
    },
}

impl Marginal {
    /// The value at `u` in (0, 1); `rng` draws missingness of continuous columns.
    fn invert(&self, u: f64, rng: &mut StdRng) -> Pick {
        match self {
            Marginal::Continuous {
                knots,
                missing,
                decimals,
                bounds,
            } => {
                if rng.random::<f64>() < *missing {
                    return Pick::Number(None);
                }
                Pick::Number(Some(finish_number(quantile(knots, u), *decimals, *bounds)))
            }
            Marginal::Discrete { cumulative, .. } => {
                let level = cumulative.partition_point(|&c| c < u);
                Pick::Level(level.min(cumulative.len() - 1))
            }
        }
    }
}

enum Pick {
    Number(Option<f64>),
    Level(usize),
}

/// Where the privacy budget went: the parts in `spent` add up to `epsilon` exactly.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrivacyBudget {
    /// ε spent: the one asked for, rounded down to a multiple of 2⁻²⁰.
    pub epsilon: f64,
    /// 0 unless some level set came from the data (then levels one row alone brings in
    /// appear with at most this chance).
    pub delta: f64,
    pub mechanism: &'static str,
    pub neighbours: &'static str,
    /// What the guarantee takes as known.
    pub public: &'static str,
    pub spent: Vec<Spend>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Copula {
    pub names: Vec<String>,
    pub marginals: Vec<Marginal>,
    /// Correlation of the latent normals, row-major d × d.
    pub correlation: Vec<f64>,
    cholesky: Vec<f64>,
    pub budget: Option<PrivacyBudget>,
}

impl Copula {
    /// Fits the copula on `columns` (the learned ones), privately when `epsilon` is given.
    /// Fails when a private fit cannot place a column without declared bounds, or when `stop`
    /// says so (asked between its column pairs' scores, the long part of a private fit).
    pub fn fit(
        columns: &[(&Column, ColumnSpec)],
        epsilon: Option<f64>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Copula, String> {
        Copula::fit_noised(columns, epsilon.map(|e| (e, Noise::from_os())), stop)
    }

    /// [`Copula::fit`], a private fit's noise drawn from `privacy`'s source.
    pub fn fit_noised(
        columns: &[(&Column, ColumnSpec)],
        privacy: Option<(f64, Noise)>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Copula, String> {
        let d = columns.len();
        let names = columns.iter().map(|(c, _)| c.name.clone()).collect();
        let (marginals, correlation, budget) = match privacy {
            None => {
                let fitted = fit_marginals(columns);
                let scores: Vec<&[Option<f64>]> = fitted.iter().map(|f| &f.1[..]).collect();
                let correlation = latent_correlation(&scores);
                (fitted.into_iter().map(|f| f.0).collect(), correlation, None)
            }
            Some((epsilon, noise)) => {
                let epsilon = Epsilon::at_most(epsilon).expect("ε is validated to be ≥ 0.01");
                let (marginals, correlation, budget) = fit_private(columns, epsilon, noise, stop)?;
                (marginals, correlation, Some(budget))
            }
        };
        let correlation = nearest_correlation(&correlation, d, EIGEN_FLOOR);
        let cholesky = cholesky(&correlation, d).unwrap_or_else(|| super::stats::identity(d));
        Ok(Copula {
            names,
            marginals,
            correlation,
            cholesky,
            budget,
        })
    }

    /// `rows` synthetic rows, one column per learned column, in order.
    pub fn sample(&self, rows: usize, rng: &mut StdRng) -> Vec<Values> {
        let d = self.marginals.len();
        let mut picks: Vec<Vec<Pick>> = (0..d).map(|_| Vec::with_capacity(rows)).collect();
        let mut noise = vec![0.0; d];
        for _ in 0..rows {
            for e in noise.iter_mut() {
                *e = standard_normal(rng);
            }
            for (i, marginal) in self.marginals.iter().enumerate() {
                let z: f64 = (0..=i).map(|k| self.cholesky[i * d + k] * noise[k]).sum();
                let u = normal_cdf(z).clamp(1e-12, 1.0 - 1e-12);
                picks[i].push(marginal.invert(u, rng));
            }
        }
        picks
            .into_iter()
            .zip(&self.marginals)
            .map(|(picks, marginal)| match marginal {
                Marginal::Continuous { .. } => Values::Numbers(
                    picks
                        .into_iter()
                        .map(|p| match p {
                            Pick::Number(v) => v,
                            Pick::Level(_) => unreachable!("continuous marginals pick numbers"),
                        })
                        .collect(),
                ),
                Marginal::Discrete { levels, .. } => {
                    let rows: Vec<usize> = picks
                        .into_iter()
                        .map(|p| match p {
                            Pick::Level(l) => l,
                            Pick::Number(_) => unreachable!("discrete marginals pick levels"),
                        })
                        .collect();
                    levels.take(&rows)
                }
            })
            .collect()
    }
}

/// Every column's marginal and each row's normal score (`None` where a continuous column is
/// missing: those rows sit out of its correlations).
///
/// Numbers have an order; labels do not, and the copula can only carry a monotone relation.
/// So a categorical's levels are ordered by the mean score, per level, of the ordered column
/// they explain best (largest correlation ratio η²): cut, say, then goes from the levels of
/// cheap diamonds to those of dear ones.
fn fit_marginals(columns: &[(&Column, ColumnSpec)]) -> Vec<(Marginal, Vec<Option<f64>>)> {
    let categorical = |(column, spec): &(&Column, ColumnSpec)| {
        matches!(column.values, Values::Labels(_)) || spec.role == Role::Categorical
    };
    // Categoricals start in frequency order, then each is ordered against every other
    // column's current scores, so that related categoricals line up with each other too.
    let mut dictionaries = Vec::new();
    let mut fitted: Vec<(Marginal, Vec<Option<f64>>)> = columns
        .iter()
        .map(|c| {
            if categorical(c) {
                let (codes, levels) = c.0.values.dictionary();
                let order: Vec<usize> = (0..levels.len()).collect();
                let f = discrete(&codes, &levels, &order);
                dictionaries.push(Some((codes, levels)));
                f
            } else {
                dictionaries.push(None);
                fit_ordered(c.0, &c.1)
            }
        })
        .collect();
    for (i, dictionary) in dictionaries.iter().enumerate() {
        let Some((codes, levels)) = dictionary else {
            continue;
        };
        let partners: Vec<&[Option<f64>]> = fitted
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, f)| &f.1[..])
            .collect();
        let order = explaining_order(codes, levels.len(), &partners);
        fitted[i] = discrete(codes, levels, &order);
    }
    fitted
}

/// A discrete marginal over `levels` taken in `order`, and each row's score.
fn discrete(codes: &[usize], levels: &Values, order: &[usize]) -> (Marginal, Vec<Option<f64>>) {
    let mut position = vec![0; order.len()];
    for (rank, &level) in order.iter().enumerate() {
        position[level] = rank;
    }
    let mut counts = vec![0.0; order.len()];
    for &code in codes {
        counts[position[code]] += 1.0;
    }
    let cumulative = cumulative(&counts);
    let level_scores: Vec<f64> = (0..order.len())
        .map(|k| {
            let lo = if k == 0 { 0.0 } else { cumulative[k - 1] };
            interval_mean(lo, cumulative[k])
        })
        .collect();
    let scores = codes
        .iter()
        .map(|&c| Some(level_scores[position[c]]))
        .collect();
    let marginal = Marginal::Discrete {
        levels: levels.take(order),
        cumulative,
    };
    (marginal, scores)
}

/// Level order by mean score in the partner column with the largest η²; frequency order
/// (the dictionary's) when no partner explains anything.
fn explaining_order(codes: &[usize], levels: usize, partners: &[&[Option<f64>]]) -> Vec<usize> {
    let mut best: Option<(f64, Vec<f64>)> = None;
    for partner in partners {
        let mut sums = vec![0.0; levels];
        let mut counts = vec![0.0; levels];
        let (mut total, mut total_sq, mut n) = (0.0, 0.0, 0.0);
        for (&code, score) in codes.iter().zip(partner.iter()) {
            if let Some(s) = score {
                sums[code] += s;
                counts[code] += 1.0;
                total += s;
                total_sq += s * s;
                n += 1.0;
            }
        }
        if n < 2.0 {
            continue;
        }
        let mean = total / n;
        let spread = total_sq - n * mean * mean;
        let between: f64 = (0..levels)
            .filter(|&l| counts[l] > 0.0)
            .map(|l| counts[l] * (sums[l] / counts[l] - mean).powi(2))
            .sum();
        let eta = if spread > 0.0 { between / spread } else { 0.0 };
        if best.as_ref().is_none_or(|b| eta > b.0) {
            let means = (0..levels)
                .map(|l| {
                    if counts[l] > 0.0 {
                        sums[l] / counts[l]
                    } else {
                        f64::INFINITY
                    }
                })
                .collect();
            best = Some((eta, means));
        }
    }
    let mut order: Vec<usize> = (0..levels).collect();
    if let Some((eta, means)) = best {
        if eta > 1e-3 {
            order.sort_by(|&a, &b| means[a].total_cmp(&means[b]).then(a.cmp(&b)));
        }
    }
    order
}

/// A numeric column: few-valued ones as levels in numeric order (missing last), others as
/// interpolated quantiles.
fn fit_ordered(column: &Column, spec: &ColumnSpec) -> (Marginal, Vec<Option<f64>>) {
    let Values::Numbers(values) = &column.values else {
        unreachable!("only numbers are ordered")
    };
    if distinct_at_most(values, MAX_DISCRETE_LEVELS) {
        let (codes, levels) = column.values.dictionary();
        let Values::Numbers(level_values) = &levels else {
            unreachable!("numbers make number levels")
        };
        let mut order: Vec<usize> = (0..level_values.len()).collect();
        order.sort_by(|&a, &b| match (level_values[a], level_values[b]) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (x, y) => x.is_none().cmp(&y.is_none()),
        });
        return discrete(&codes, &levels, &order);
    }
    let mut present: Vec<(f64, usize)> = values
        .iter()
        .enumerate()
        .filter_map(|(row, v)| Some(((*v)?, row)))
        .collect();
    present.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = present.len();
    let mut scores = vec![None; values.len()];
    // Tied values share the normal score of the CDF interval they occupy together.
    let mut start = 0;
    while start < n {
        // At least one value a turn, whatever compares how (a NaN equals nothing, itself too).
        let mut end = start + 1;
        while end < n && present[end].0.total_cmp(&present[start].0).is_eq() {
            end += 1;
        }
        let score = interval_mean(start as f64 / n as f64, end as f64 / n as f64);
        for &(_, row) in &present[start..end] {
            scores[row] = Some(score);
        }
        start = end;
    }
    let sorted: Vec<f64> = present.iter().map(|p| p.0).collect();
    let knots = if sorted.is_empty() {
        vec![0.0]
    } else if sorted.len() <= KNOTS {
        sorted.clone()
    } else {
        (0..KNOTS)
            .map(|i| quantile(&sorted, i as f64 / (KNOTS - 1) as f64))
            .collect()
    };
    let marginal = Marginal::Continuous {
        knots,
        missing: 1.0 - n as f64 / values.len().max(1) as f64,
        decimals: if column.is_integral() {
            Some(0)
        } else {
            decimals(&sorted)
        },
        bounds: spec.bounds,
    };
    (marginal, scores)
}

fn distinct_at_most(values: &[Option<f64>], limit: usize) -> bool {
    let mut seen: Vec<u64> = Vec::new();
    for v in values.iter().flatten() {
        let bits = v.to_bits();
        if !seen.contains(&bits) {
            if seen.len() == limit {
                return false;
            }
            seen.push(bits);
        }
    }
    true
}

/// The fewest decimals (up to 6) that every value is written with, if any.
fn decimals(values: &[f64]) -> Option<u32> {
    (0..=6u32).find(|&d| {
        let scale = 10f64.powi(d as i32);
        values
            .iter()
            .all(|v| ((v * scale).round() / scale - v).abs() <= 1e-9 * v.abs().max(1.0))
    })
}

fn cumulative(counts: &[f64]) -> Vec<f64> {
    let total: f64 = counts.iter().sum();
    let mut running = 0.0;
    let mut out: Vec<f64> = counts
        .iter()
        .map(|c| {
            running += if total > 0.0 {
                c / total
            } else {
                1.0 / counts.len() as f64
            };
            running
        })
        .collect();
    if let Some(last) = out.last_mut() {
        *last = 1.0;
    }
    out
}

/// The latent normals' correlation from the columns' scores: Pearson over complete pairs,
/// divided by each score's standard deviation. A discrete score is the mean of the latent
/// normal over its level's interval, which shrinks its correlations by exactly that
/// deviation; undoing it keeps categorical–numeric relations as strong as in the data.
fn latent_correlation(scores: &[&[Option<f64>]]) -> Vec<f64> {
    let d = scores.len();
    let spread: Vec<f64> = scores
        .iter()
        .map(|s| {
            let present: Vec<f64> = s.iter().flatten().copied().collect();
            let n = present.len().max(1) as f64;
            let mean = present.iter().sum::<f64>() / n;
            let var = present.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            var.sqrt().clamp(0.05, 1.0)
        })
        .collect();
    let mut m = super::stats::identity(d);
    for i in 0..d {
        for j in i + 1..d {
            let r = pearson(scores[i], scores[j]).unwrap_or(0.0) / (spread[i] * spread[j]);
            m[i * d + j] = r.clamp(-1.0, 1.0);
            m[j * d + i] = m[i * d + j];
        }
    }
    m
}

/// Noisy marginals and noisy Kendall's taus; see the module notes.
fn fit_private(
    columns: &[(&Column, ColumnSpec)],
    epsilon: Epsilon,
    mut noise: Noise,
    stop: &dyn Fn() -> bool,
) -> Result<(Vec<Marginal>, Vec<f64>, PrivacyBudget), String> {
    let d = columns.len().max(1);
    let n = columns.first().map_or(0, |(c, _)| c.values.len()).max(2);
    let (marginals_epsilon, correlation_epsilon) = if d >= 2 {
        (epsilon.share(1, 2), epsilon.share(1, 2))
    } else {
        (epsilon, epsilon.share(0, 1))
    };
    let per_column = marginals_epsilon.share(1, d as u64);
    let is_levels = |(column, spec): &&(&Column, ColumnSpec)| {
        !matches!(
            (&column.values, spec.role),
            (Values::Numbers(_), Role::Numerical | Role::Datetime)
        )
    };
    let thresholded = columns
        .iter()
        .filter(is_levels)
        .filter(|(_, spec)| spec.levels.is_none())
        .count();
    let delta_each = DELTA / thresholded.max(1) as f64;
    let mut marginals = Vec::with_capacity(d);
    // Each row's rank key per column, for Kendall's tau (missing and dropped levels lowest).
    let mut rank_keys: Vec<Vec<f64>> = Vec::with_capacity(d);
    for entry in columns {
        let (column, spec) = entry;
        if is_levels(&entry) {
            let (codes, domain) = level_domain(&column.values, spec.levels.as_deref());
            let mut counts = vec![0u64; domain.len()];
            for &code in &codes {
                counts[code] += 1;
            }
            let noisy = noise.counts(format!("{}: levels", column.name), &counts, per_column);
            let threshold = match spec.levels {
                Some(_) => 0,
                None => level_threshold(per_column, delta_each),
            };
            let missing = |level: usize| match &domain {
                Values::Numbers(v) => v[level].is_none(),
                Values::Labels(v) => v[level].is_none(),
            };
            // Missing is always a level; the others only above the threshold. Ordered by
            // noisy count: the true order is private too.
            let mut order: Vec<usize> = (0..domain.len())
                .filter(|&l| missing(l) || noisy[l] >= threshold)
                .collect();
            order.sort_by(|&a, &b| noisy[b].cmp(&noisy[a]).then(a.cmp(&b)));
            let mut position = vec![f64::NEG_INFINITY; domain.len()];
            for (rank, &level) in order.iter().enumerate() {
                position[level] = rank as f64;
            }
            rank_keys.push(codes.iter().map(|&c| position[c]).collect());
            let kept: Vec<f64> = order.iter().map(|&l| noisy[l] as f64).collect();
            marginals.push(Marginal::Discrete {
                levels: domain.take(&order),
                cumulative: cumulative(&kept),
            });
            continue;
        }
        let Values::Numbers(values) = &column.values else {
            unreachable!("numbers take the histogram path")
        };
        let (lo, hi, histogram_epsilon) = match spec.bounds {
            (Some(lo), Some(hi)) => (lo, hi, per_column),
            (lo, hi) => {
                let bounds_epsilon = per_column.share(1, 4);
                let (private_lo, private_hi) =
                    dp::bounds(&column.name, values, bounds_epsilon, &mut noise).ok_or_else(
                        || {
                            format!(
                                "column {:?}: too few rows for ε to find its bounds privately \
                                 (no value range held {} rows after noise); give its `min` \
                                 and `max` in `columns`",
                                column.name,
                                dp::bounds_threshold(bounds_epsilon)
                            )
                        },
                    )?;
                (
                    lo.unwrap_or(private_lo),
                    hi.unwrap_or(private_hi),
                    per_column.minus(bounds_epsilon),
                )
            }
        };
        let hi = hi.max(lo);
        let integral = column.is_integral();
        // Whole numbers over a short range get one bin per value.
        let unit_bins = integral && lo.ceil() <= hi.floor() && hi.floor() - lo.ceil() < 64.0;
        let bins = if unit_bins {
            (hi.floor() - lo.ceil()) as usize + 1
        } else {
            DP_BINS
        };
        let first = if unit_bins { lo.ceil() } else { lo };
        let width = if unit_bins {
            1.0
        } else {
            (hi - lo) / bins as f64
        };
        // Last slot: missing.
        let mut counts = vec![0u64; bins + 1];
        for v in values {
            let slot = match v {
                None => bins,
                Some(_) if width <= 0.0 => 0,
                Some(v) if unit_bins => {
                    ((v.clamp(first, hi) - first).round() as usize).min(bins - 1)
                }
                Some(v) => (((v.clamp(lo, hi) - lo) / width) as usize).min(bins - 1),
            };
            counts[slot] += 1;
        }
        let counts: Vec<f64> = noise
            .counts(
                format!("{}: histogram", column.name),
                &counts,
                histogram_epsilon,
            )
            .into_iter()
            .map(|c| c as f64)
            .collect();
        let total: f64 = counts.iter().sum();
        let missing = if total > 0.0 {
            counts[bins] / total
        } else {
            0.0
        };
        marginals.push(if unit_bins {
            let mut levels: Vec<Option<f64>> = (0..bins).map(|k| Some(first + k as f64)).collect();
            levels.push(None);
            Marginal::Discrete {
                levels: Values::Numbers(levels),
                cumulative: cumulative(&counts),
            }
        } else {
            Marginal::Continuous {
                knots: histogram_knots(&counts[..bins], lo, width),
                missing,
                decimals: integral.then_some(0),
                bounds: (Some(lo), Some(hi)),
            }
        });
        rank_keys.push(
            values
                .iter()
                .map(|v| v.map_or(f64::NEG_INFINITY, |v| v.clamp(lo, hi)))
                .collect(),
        );
    }
    let mut correlation = super::stats::identity(d);
    let pairs: Vec<(usize, usize)> = (0..d)
        .flat_map(|i| (i + 1..d).map(move |j| (i, j)))
        .collect();
    if !pairs.is_empty() {
        // d²/2 scores of n log n each (an hour of a core at 500 columns): a cancel is heard
        // between them, not only once they are all done.
        let mut scores = Vec::with_capacity(pairs.len());
        for (k, &(i, j)) in pairs.iter().enumerate() {
            if k % 64 == 0 && stop() {
                return Err("the fit was stopped".into());
            }
            scores.push(kendall_score(&rank_keys[i], &rank_keys[j]));
        }
        // One row changes n − 1 of each score's pairs, each by at most 2.
        let sensitivity = pairs.len() as u64 * 2 * (n as u64 - 1);
        let what = format!(
            "correlations: Kendall's tau of {} column pairs",
            pairs.len()
        );
        let noisy = noise.release_all(what, &scores, sensitivity, correlation_epsilon);
        let total_pairs = (n * (n - 1) / 2) as f64;
        for (&(i, j), score) in pairs.iter().zip(noisy) {
            let tau = (score as f64 / total_pairs).clamp(-1.0, 1.0);
            let rho = (std::f64::consts::FRAC_PI_2 * tau).sin();
            correlation[i * d + j] = rho;
            correlation[j * d + i] = rho;
        }
    }
    let budget = PrivacyBudget {
        epsilon: epsilon.value(),
        delta: if thresholded > 0 { DELTA } else { 0.0 },
        mechanism: "discrete Laplace (Canonne, Kamath & Steinke 2020) on integer counts and \
                    concordance scores, sampled exactly from ChaCha20 keyed by the job's seed of \
                    the operating system's CSPRNG, kept unseen",
        neighbours: "tables differing in one replaced row",
        public: "the row count, column names and types, and the settings given in `columns` \
                 (roles, min/max, values)",
        spent: noise.into_spent(),
    };
    Ok((marginals, correlation, budget))
}

/// Each row's level in a domain, and the domain: the declared labels when given (values
/// outside them count as missing), else the data's own; missing is always in it, so its
/// presence tells nothing.
fn level_domain(values: &Values, declared: Option<&[String]>) -> (Vec<usize>, Values) {
    let (codes, mut domain) = match declared {
        None => {
            let (codes, levels) = values.dictionary();
            let domain: Vec<Option<String>> = match levels {
                Values::Labels(l) => l,
                Values::Numbers(l) => l.iter().map(|v| v.map(|v| v.to_string())).collect(),
            };
            (codes, domain)
        }
        Some(declared) => {
            let domain: Vec<Option<String>> = declared.iter().cloned().map(Some).collect();
            let index: HashMap<&str, usize> = declared
                .iter()
                .enumerate()
                .map(|(i, label)| (label.as_str(), i))
                .collect();
            let key = |row: usize| -> Option<usize> {
                match values {
                    Values::Labels(v) => index.get(v[row].as_deref()?).copied(),
                    Values::Numbers(v) => index.get(v[row]?.to_string().as_str()).copied(),
                }
            };
            let codes = (0..values.len())
                .map(|row| key(row).unwrap_or(declared.len()))
                .collect();
            (codes, domain)
        }
    };
    if !domain.contains(&None) {
        domain.push(None);
    }
    let missing = domain
        .iter()
        .position(Option::is_none)
        .expect("pushed above");
    let codes = match declared {
        Some(d) => codes
            .into_iter()
            .map(|c| if c == d.len() { missing } else { c })
            .collect(),
        None => codes,
    };
    let domain = match values {
        Values::Labels(_) => Values::Labels(domain),
        Values::Numbers(_) => Values::Numbers(
            domain
                .iter()
                .map(|k| k.as_deref().and_then(|k| k.parse().ok()))
                .collect(),
        ),
    };
    (codes, domain)
}

/// Quantile knots of a histogram with uniform mass inside each bin.
fn histogram_knots(counts: &[f64], lo: f64, width: f64) -> Vec<f64> {
    let cumulative = cumulative(counts);
    (0..KNOTS)
        .map(|i| {
            let p = i as f64 / (KNOTS - 1) as f64;
            let bin = cumulative.partition_point(|&c| c < p).min(counts.len() - 1);
            let before = if bin == 0 { 0.0 } else { cumulative[bin - 1] };
            let mass = cumulative[bin] - before;
            let within = if mass > 0.0 { (p - before) / mass } else { 0.5 };
            lo + width * (bin as f64 + within.clamp(0.0, 1.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthesis::table::Table;
    use polars::prelude::DataType;
    use rand::SeedableRng;

    /// x ~ N(50, 10); y = x + noise (ρ ≈ 0.8); group depends on x; flag independent; 5 %
    /// of x missing.
    fn table(n: usize, seed: u64) -> Table {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        let mut group = Vec::new();
        let mut flag = Vec::new();
        for _ in 0..n {
            let a = standard_normal(&mut rng);
            let b = 0.8 * a + 0.6 * standard_normal(&mut rng);
            x.push((rng.random::<f64>() > 0.05).then_some(50.0 + 10.0 * a));
            y.push(Some(b));
            group.push(Some(
                if a > 0.5 {
                    "high"
                } else if a > -0.5 {
                    "mid"
                } else {
                    "low"
                }
                .into(),
            ));
            flag.push(Some((rng.random::<f64>() < 0.3).to_string()));
        }
        Table {
            columns: vec![
                Column::numbers("x", DataType::Float64, x),
                Column::numbers("y", DataType::Float64, y),
                Column::labels("group", group),
                Column::labels("flag", flag),
            ],
        }
    }

    #[test]
    fn learns_the_correlation_and_the_marginals() {
        let data = table(4000, 1);
        let mut rng = StdRng::seed_from_u64(2);
        let copula = Copula::fit(&plain_specs(&data.columns), None, &|| false).unwrap();
        assert!(
            (copula.correlation[1] - 0.8).abs() < 0.05,
            "{:?}",
            copula.correlation
        );
        // The group is x cut at ±0.5σ: its latent correlation with x is near 1 once the
        // discreteness is undone.
        assert!(copula.correlation[2] > 0.9, "{:?}", copula.correlation);
        assert!(copula.correlation[3].abs() < 0.06);

        let synthetic = copula.sample(4000, &mut rng);
        let Values::Numbers(x) = &synthetic[0] else {
            panic!()
        };
        let Values::Numbers(y) = &synthetic[1] else {
            panic!()
        };
        let missing = x.iter().filter(|v| v.is_none()).count() as f64 / 4000.0;
        assert!((missing - 0.05).abs() < 0.015, "{missing}");
        let r = pearson(x, y).unwrap();
        assert!((r - 0.8).abs() < 0.05, "{r}");
        let present: Vec<f64> = x.iter().flatten().copied().collect();
        let mean = present.iter().sum::<f64>() / present.len() as f64;
        assert!((mean - 50.0).abs() < 0.7, "{mean}");
        let Values::Labels(flag) = &synthetic[3] else {
            panic!()
        };
        let share = flag.iter().filter(|f| f.as_deref() == Some("true")).count() as f64 / 4000.0;
        assert!((share - 0.3).abs() < 0.03, "{share}");
    }

    /// A NaN never equals itself: the ties' walk stood still on it for ever (a synthesis of a
    /// CSV with a `NaN` cell spun its worker thread, uncancellable). Read from a file, NaN and
    /// infinities are missing values.
    #[test]
    fn a_nan_ends_the_fit_and_files_read_it_as_missing() {
        let mut values: Vec<Option<f64>> = (0..40).map(|i| Some(i as f64)).collect();
        values.extend([Some(f64::NAN), Some(f64::NAN)]);
        let column = Column::numbers("x", DataType::Float64, values);
        let spec = plain_specs(std::slice::from_ref(&column))[0].1.clone();
        let fit = std::thread::spawn(move || fit_ordered(&column, &spec));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fit.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the fit did not end");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        fit.join().unwrap();
        let frame = polars::prelude::df!("x" => [1.0, f64::NAN, f64::INFINITY, 2.0]).unwrap();
        let cap = crate::limits::Cap::new(1 << 20, "a test's", "the table");
        let table = crate::synthesis::table::from_frame(&frame, cap).unwrap();
        let Values::Numbers(x) = &table.columns[0].values else {
            panic!()
        };
        assert_eq!(x, &[Some(1.0), None, None, Some(2.0)]);
    }

    #[test]
    fn sampling_is_deterministic_under_a_seed() {
        let data = table(500, 3);
        let fit = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            Copula::fit(&plain_specs(&data.columns), None, &|| false)
                .unwrap()
                .sample(200, &mut rng)
        };
        assert_eq!(fit(9), fit(9));
        assert_ne!(fit(9), fit(10));
    }

    #[test]
    fn integers_stay_whole_and_floats_keep_their_decimals() {
        let mut rng = StdRng::seed_from_u64(4);
        let ints: Vec<Option<f64>> = (0..300).map(|i| Some((i * 7 % 101) as f64)).collect();
        let cents: Vec<Option<f64>> = (0..300).map(|i| Some(i as f64 * 0.37 + 0.01)).collect();
        let data = Table {
            columns: vec![
                Column::numbers("n", DataType::Int64, ints),
                Column::numbers("c", DataType::Float64, cents),
            ],
        };
        let copula = Copula::fit(&plain_specs(&data.columns), None, &|| false).unwrap();
        let sample = copula.sample(500, &mut rng);
        let Values::Numbers(n) = &sample[0] else {
            panic!()
        };
        assert!(n
            .iter()
            .flatten()
            .all(|v| v.fract() == 0.0 && (0.0..=100.0).contains(v)));
        let Values::Numbers(c) = &sample[1] else {
            panic!()
        };
        assert!(c
            .iter()
            .flatten()
            .all(|v| ((v * 100.0).round() - v * 100.0).abs() < 1e-6));
    }

    /// A private fit scores every pair of columns (d²/2 scores of n log n each, an hour of a
    /// core at 500 columns): it hears a stop between them, not only once all are done.
    #[test]
    fn a_private_fit_stops_between_its_pair_scores() {
        let data = table(3000, 5);
        let mut specs = plain_specs(&data.columns);
        specs[0].1.bounds = (Some(0.0), Some(100.0));
        specs[1].1.bounds = (Some(-4.0), Some(4.0));
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let stop = || {
            asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        };
        let stopped = Copula::fit(&specs, Some(2.0), &stop);
        assert!(stopped.is_err());
        assert_eq!(asked.into_inner(), 1);
        assert!(Copula::fit(&specs, Some(2.0), &|| false).is_ok());
    }

    #[test]
    fn private_fit_spends_the_budget_exactly_and_noise_grows_as_epsilon_shrinks() {
        let data = table(3000, 5);
        let mut specs = plain_specs(&data.columns);
        specs[0].1.bounds = (Some(0.0), Some(100.0));
        specs[1].1.bounds = (Some(-4.0), Some(4.0));
        // Measured against the same private estimator with next to no noise: what the data's
        // ties and missing values do to Kendall's tau-a (about 0.05 here) is not the noise.
        let exact = Copula::fit(&specs, Some(4000.0), &|| false)
            .unwrap()
            .correlation[1];
        let error = |epsilon: f64| {
            let mut total = 0.0;
            for _ in 0..8 {
                let copula = Copula::fit(&specs, Some(epsilon), &|| false).unwrap();
                total += (copula.correlation[1] - exact).abs();
                let budget = copula.budget.unwrap();
                let spent: f64 = budget.spent.iter().map(|s| s.epsilon).sum();
                assert!((spent - budget.epsilon).abs() < 1e-12, "{spent}");
                assert!(budget.epsilon <= epsilon && epsilon - budget.epsilon < 1e-6);
                let whats: Vec<&str> = budget.spent.iter().map(|s| s.what.as_str()).collect();
                assert_eq!(
                    whats,
                    [
                        "x: histogram",
                        "y: histogram",
                        "group: levels",
                        "flag: levels",
                        "correlations: Kendall's tau of 6 column pairs"
                    ]
                );
                // Four columns share half the budget.
                assert!((budget.spent[0].epsilon - epsilon / 8.0).abs() < 1e-5);
                assert_eq!(budget.spent[4].sensitivity, 6 * 2 * 2999);
                assert!(budget.delta > 0.0);
            }
            total / 8.0
        };
        let (loose, tight) = (error(0.05), error(50.0));
        // At ε = 50 the correlations get ε/2 for 6 pairs of 3,000 rows: the Laplace noise on
        // each tau has a standard deviation near 5e-4, so 0.01 is some 20 of them.
        assert!(tight < 0.01, "{tight}");
        assert!(loose > 3.0 * tight, "{loose} vs {tight}");
    }

    #[test]
    fn private_fit_takes_nothing_from_the_data_but_noisy_counts() {
        // A lone outlier and a lone rare label: neither reaches the model.
        let mut x: Vec<Option<f64>> = (0..5000).map(|i| Some((i % 100) as f64 + 0.5)).collect();
        x[0] = Some(1e7);
        let mut label: Vec<Option<String>> = (0..5000)
            .map(|i| Some(["a", "b"][i % 2].to_string()))
            .collect();
        label[0] = Some("Jane Doe".into());
        let data = Table {
            columns: vec![
                Column::numbers("x", DataType::Float64, x),
                Column::labels("label", label),
            ],
        };
        let copula = Copula::fit(&plain_specs(&data.columns), Some(2.0), &|| false).unwrap();
        assert_eq!(copula.budget.as_ref().unwrap().spent[0].what, "x: bounds");
        let Marginal::Continuous { knots, .. } = &copula.marginals[0] else {
            panic!("{:?}", copula.marginals[0])
        };
        assert!(*knots.last().unwrap() < 200.0, "{:?}", knots.last());
        let Marginal::Discrete { levels, .. } = &copula.marginals[1] else {
            panic!()
        };
        let Values::Labels(levels) = levels else {
            panic!()
        };
        assert!(!levels.contains(&Some("Jane Doe".into())), "{levels:?}");
        assert!(levels.contains(&Some("a".into())) && levels.contains(&None));

        // Declared values are the domain, whatever the data holds.
        let mut specs = plain_specs(&data.columns);
        specs[1].1.levels = Some(vec!["a".into(), "c".into()]);
        specs[0].1.bounds = (Some(0.0), Some(50.0));
        let copula = Copula::fit(&specs, Some(2.0), &|| false).unwrap();
        let Marginal::Discrete { levels, .. } = &copula.marginals[1] else {
            panic!()
        };
        let mut labels = match levels {
            Values::Labels(l) => l.clone(),
            _ => panic!(),
        };
        labels.sort();
        assert_eq!(labels, [None, Some("a".into()), Some("c".into())]);
        let budget = copula.budget.unwrap();
        assert_eq!(budget.delta, 0.0);
        assert_eq!(budget.spent[0].what, "x: histogram");
    }
}
