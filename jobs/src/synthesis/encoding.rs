//! The mode-specific normalisation that TVAE and CTGAN (Xu et al., 2019) share: each column
//! becomes a slice of an encoded row.
//!
//! - A continuous column gets a small Gaussian mixture (EM, up to 10 modes, as RDT's
//!   ClusterBasedNormalizer that the reference uses; with 5, CTGAN missed multimodal columns
//!   such as Wage's `wage`: overall 0.777 against 0.815 over ten seeds); a value becomes
//!   its most likely mode (one-hot, with one more slot for missing) and its offset from that
//!   mode's mean in units of 4σ (a tanh output in the networks).
//! - A discrete column (labels, few-valued numbers) is one-hot over its most frequent levels;
//!   the rest share one slot, decoded by drawing among them by frequency.

use rand::{rngs::StdRng, Rng};

use crate::JobError;

use super::{
    copula::{finish_number, ColumnSpec},
    profile::{quantile, Role},
    stats::standard_normal,
    table::{Column, Values},
};

const MAX_MODES: usize = 10;
const MAX_LEVELS: usize = 100;
const MAX_DISCRETE_NUMBERS: usize = 32;

/// One column's slice of the encoded row.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(super) enum Encoder {
    Continuous {
        /// Offset's position in the row; the modes' one-hot follows it.
        at: usize,
        means: Vec<f64>,
        stds: Vec<f64>,
        /// A slot after the modes for missing values.
        missing: bool,
        decimals: Option<u32>,
        bounds: (Option<f64>, Option<f64>),
    },
    Discrete {
        at: usize,
        /// The one-hot slots' levels; with `rare`, the last slot stands for all of them.
        levels: Values,
        slots: usize,
        /// Levels beyond the slots, with their counts.
        rare: Vec<(usize, f64)>,
    },
}

impl Encoder {
    pub(super) fn width(&self) -> usize {
        match self {
            Encoder::Continuous { means, missing, .. } => 1 + means.len() + usize::from(*missing),
            Encoder::Discrete { slots, .. } => *slots,
        }
    }

    /// The softmax groups (start, length) of this column's slice.
    pub(super) fn group(&self) -> (usize, usize) {
        match self {
            Encoder::Continuous { at, .. } => (at + 1, self.width() - 1),
            Encoder::Discrete { at, slots, .. } => (*at, *slots),
        }
    }
}

/// The width of a row of these encoders, if each starts where the one before ends (as
/// [`encode_columns`] lays them out) and holds what decoding reads: what a model read from a
/// file is checked against.
pub(super) fn laid_out(encoders: &[Encoder]) -> Option<usize> {
    encoders.iter().try_fold(0, |width, encoder| {
        let (at, sound) = match encoder {
            Encoder::Continuous {
                at, means, stds, ..
            } => (*at, !means.is_empty() && stds.len() == means.len()),
            Encoder::Discrete {
                at,
                levels,
                slots,
                rare,
            } => {
                let shared = usize::from(!rare.is_empty());
                let levels = levels.len();
                let rare_fit = rare.iter().all(|&(level, _)| level < levels);
                (*at, *slots >= 1 && levels >= *slots - shared && rare_fit)
            }
        };
        (at == width && sound).then(|| width + encoder.width())
    })
}

/// The columns' encoders and their rows, encoded: row-major, `width` wide.
pub(super) struct Encoded {
    pub encoders: Vec<Encoder>,
    pub width: usize,
    pub data: Vec<f32>,
}

/// The columns encoded, once `room` has passed their encoders and width (a network sizes its
/// layers by them: refused before any is built, or the rows encoded).
pub(super) fn encode_columns(
    columns: &[(&Column, ColumnSpec)],
    room: impl FnOnce(&[Encoder], usize) -> Result<(), JobError>,
) -> Result<Encoded, JobError> {
    let rows = columns.first().map_or(0, |(c, _)| c.values.len());
    let mut encoders = Vec::new();
    let mut width = 0;
    for (column, spec) in columns {
        let encoder = fit_encoder(column, spec, width);
        width += encoder.width();
        encoders.push(encoder);
    }
    room(&encoders, width)?;
    let mut data = vec![0f32; rows * width];
    for (encoder, (column, _)) in encoders.iter().zip(columns) {
        encode(encoder, &column.values, &mut data, width);
    }
    Ok(Encoded {
        encoders,
        width,
        data,
    })
}

/// What training holds of a network of `weights` on `rows` encoded `width` wide: each weight
/// four times (itself, its gradient, Adam's two moments) and the encoded rows, 4 bytes each;
/// refused past `cap`, naming the network and what makes it large.
pub(super) fn training_fits(
    network: &str,
    weights: u64,
    rows: usize,
    width: usize,
    cap: u64,
) -> Result<(), JobError> {
    let bytes = weights
        .saturating_mul(16)
        .saturating_add((rows as u64).saturating_mul(width as u64).saturating_mul(4));
    if bytes <= cap {
        return Ok(());
    }
    Err(JobError::Permanent(format!(
        "a {network} of this table would hold {bytes} bytes while it trains (its columns \
         encode {width} values wide: each categorical level is one), past \
         CONVEYOR_MAX_IN_MEMORY_BYTES ({cap}): learn fewer or less varied columns, or use \
         gaussian_copula"
    )))
}

/// The largest logit's index: a continuous value's mode, as TVAE decodes it.
fn argmax(logits: &[f32]) -> usize {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap_or(0)
}

/// An index drawn with the softmax probabilities of `logits`: a label. (TVAE takes the
/// argmax; a draw keeps the frequencies where the decoder learned little from the code.)
fn draw(logits: &[f32], rng: &mut StdRng) -> usize {
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - top).exp()).collect();
    let mut target = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if target < *w {
            return i;
        }
        target -= w;
    }
    logits.len() - 1
}

/// Rows a network's sample decodes at a time, for rows encoded by `encoders`: about 16 MiB of
/// raw outputs (a float per slot of each encoded row). Decoded all at once, the raw outputs of
/// a 10M-row sample of one 100-level column held about 4 GB, far past what the output's size
/// check counts.
pub(super) fn decoded_rows(encoders: &[Encoder]) -> usize {
    let width: usize = encoders.iter().map(Encoder::width).sum();
    let row = width * size_of::<f32>() + size_of::<Vec<f32>>();
    ((16 << 20) / row).max(1)
}

/// Appends each of `part`'s columns to its column of `columns` (the first part becomes them).
pub(super) fn append_columns(columns: &mut Vec<Values>, part: Vec<Values>) {
    if columns.is_empty() {
        *columns = part;
        return;
    }
    for (all, more) in columns.iter_mut().zip(part) {
        all.append(more);
    }
}

/// One column of `rows` (the networks' raw outputs) decoded. A continuous value's mode is the
/// largest logit (TVAE) or, with `draw_mode`, drawn by the softmax of the logits (CTGAN's
/// Gumbel-softmax output read by its argmax); `sigma` adds Gaussian noise to the offset.
pub(super) fn decode(
    encoder: &Encoder,
    rows: &[Vec<f32>],
    sigma: f64,
    draw_mode: bool,
    rng: &mut StdRng,
) -> Values {
    match encoder {
        Encoder::Continuous {
            at,
            means,
            stds,
            missing,
            decimals,
            bounds,
        } => Values::Numbers(
            rows.iter()
                .map(|row| {
                    let modes = &row[at + 1..at + 1 + means.len() + usize::from(*missing)];
                    let mode = match draw_mode {
                        true => draw(modes, rng),
                        false => argmax(modes),
                    };
                    if mode == means.len() {
                        return None;
                    }
                    let noise = if sigma > 0.0 {
                        sigma * standard_normal(rng)
                    } else {
                        0.0
                    };
                    let offset = (f64::from(row[*at]).tanh() + noise).clamp(-1.0, 1.0);
                    Some(finish_number(
                        offset * 4.0 * stds[mode] + means[mode],
                        *decimals,
                        *bounds,
                    ))
                })
                .collect(),
        ),
        Encoder::Discrete {
            at,
            levels,
            slots,
            rare,
        } => {
            let rare_total: f64 = rare.iter().map(|r| r.1).sum();
            let picks: Vec<usize> = rows
                .iter()
                .map(|row| {
                    let slot = draw(&row[*at..at + slots], rng);
                    if !rare.is_empty() && slot == slots - 1 {
                        let mut target = rng.random::<f64>() * rare_total;
                        for (level, count) in rare {
                            if target < *count {
                                return *level;
                            }
                            target -= count;
                        }
                        rare.last().map_or(slot, |r| r.0)
                    } else {
                        slot
                    }
                })
                .collect();
            levels.take(&picks)
        }
    }
}

fn fit_encoder(column: &Column, spec: &ColumnSpec, at: usize) -> Encoder {
    let discrete = match (&column.values, spec.role) {
        (Values::Labels(_), _) | (_, Role::Categorical) => true,
        (Values::Numbers(values), _) => {
            let mut distinct: Vec<u64> = values.iter().flatten().map(|v| v.to_bits()).collect();
            distinct.sort_unstable();
            distinct.dedup();
            distinct.len() <= MAX_DISCRETE_NUMBERS
        }
    };
    if discrete {
        let (codes, levels) = column.values.dictionary();
        let mut counts = vec![0.0; levels.len()];
        for &c in &codes {
            counts[c] += 1.0;
        }
        let (slots, rare) = if levels.len() > MAX_LEVELS {
            let rare = (MAX_LEVELS - 1..levels.len())
                .map(|l| (l, counts[l]))
                .collect();
            (MAX_LEVELS, rare)
        } else {
            (levels.len(), Vec::new())
        };
        return Encoder::Discrete {
            at,
            levels,
            slots,
            rare,
        };
    }
    let Values::Numbers(values) = &column.values else {
        unreachable!("labels are discrete")
    };
    let mut present: Vec<f64> = values.iter().flatten().copied().collect();
    present.sort_by(f64::total_cmp);
    let (means, stds) = mixture(&present);
    let decimals = if column.is_integral() {
        Some(0)
    } else {
        (0..=6u32).find(|&d| {
            let scale = 10f64.powi(d as i32);
            present
                .iter()
                .all(|v| ((v * scale).round() / scale - v).abs() <= 1e-9 * v.abs().max(1.0))
        })
    };
    Encoder::Continuous {
        at,
        means,
        stds,
        missing: present.len() < values.len(),
        decimals,
        bounds: spec.bounds,
    }
}

/// A 1-D Gaussian mixture by EM, started at evenly spaced quantiles; modes that end up
/// nearly empty are dropped.
fn mixture(sorted: &[f64]) -> (Vec<f64>, Vec<f64>) {
    if sorted.is_empty() {
        return (vec![0.0], vec![1.0]);
    }
    let spread = (sorted[sorted.len() - 1] - sorted[0]).max(1e-9);
    let k = MAX_MODES.min(sorted.len());
    let mut means: Vec<f64> = (0..k)
        .map(|i| quantile(sorted, (i as f64 + 0.5) / k as f64))
        .collect();
    let mut stds = vec![spread / (2.0 * k as f64); k];
    let mut weights = vec![1.0 / k as f64; k];
    // Subsample large columns: the mixture only has to be roughly right.
    let step = (sorted.len() / 20_000).max(1);
    let points: Vec<f64> = sorted.iter().step_by(step).copied().collect();
    let floor = spread * 1e-3;
    let mut responsibilities = vec![0.0; points.len() * k];
    for _ in 0..50 {
        for (i, &x) in points.iter().enumerate() {
            let r = &mut responsibilities[i * k..(i + 1) * k];
            for m in 0..k {
                let z = (x - means[m]) / stds[m];
                r[m] = weights[m] * (-0.5 * z * z).exp() / stds[m];
            }
            let total: f64 = r.iter().sum::<f64>().max(1e-300);
            r.iter_mut().for_each(|v| *v /= total);
        }
        for m in 0..k {
            let mass: f64 = (0..points.len()).map(|i| responsibilities[i * k + m]).sum();
            if mass < 1e-9 {
                weights[m] = 0.0;
                continue;
            }
            let mean = (0..points.len())
                .map(|i| responsibilities[i * k + m] * points[i])
                .sum::<f64>()
                / mass;
            let var = (0..points.len())
                .map(|i| responsibilities[i * k + m] * (points[i] - mean).powi(2))
                .sum::<f64>()
                / mass;
            means[m] = mean;
            stds[m] = var.sqrt().max(floor);
            weights[m] = mass / points.len() as f64;
        }
    }
    let kept: Vec<usize> = (0..k)
        .filter(|&m| weights[m] > 0.005 && means[m].is_finite() && stds[m].is_finite())
        .collect();
    if kept.is_empty() {
        // Values too far apart for the fit (one of 1e160 beside ordinary ones overflowed its
        // variances, and every mode was dropped; encoding then indexed an empty list): one
        // mode over them all, at their middle, as wide as they spread.
        let middle = sorted[sorted.len() / 2];
        let wide = (spread / 4.0).clamp(1e-9, f64::MAX / 8.0);
        return (vec![middle], vec![wide]);
    }
    (
        kept.iter().map(|&m| means[m]).collect(),
        kept.iter().map(|&m| stds[m]).collect(),
    )
}

/// Writes the column's encoding into each row of `data` (row-major, `width` wide).
fn encode(encoder: &Encoder, values: &Values, data: &mut [f32], width: usize) {
    match (encoder, values) {
        (
            Encoder::Continuous {
                at,
                means,
                stds,
                missing,
                ..
            },
            Values::Numbers(values),
        ) => {
            for (row, value) in values.iter().enumerate() {
                let base = row * width + at;
                match value {
                    None => {
                        debug_assert!(*missing);
                        data[base + 1 + means.len()] = 1.0;
                    }
                    Some(x) => {
                        let mode = (0..means.len())
                            .max_by(|&a, &b| {
                                let density = |m: usize| {
                                    let z = (x - means[m]) / stds[m];
                                    -0.5 * z * z - stds[m].ln()
                                };
                                density(a).total_cmp(&density(b))
                            })
                            .unwrap_or(0);
                        data[base] =
                            ((x - means[mode]) / (4.0 * stds[mode])).clamp(-0.99, 0.99) as f32;
                        data[base + 1 + mode] = 1.0;
                    }
                }
            }
        }
        (Encoder::Discrete { at, slots, .. }, values) => {
            let (codes, _) = values.dictionary();
            for (row, code) in codes.into_iter().enumerate() {
                data[row * width + at + code.min(slots - 1)] = 1.0;
            }
        }
        (Encoder::Continuous { .. }, Values::Labels(_)) => {
            unreachable!("labels are encoded as discrete")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixture_of_values_far_apart_keeps_a_mode() {
        let mut data: Vec<f64> = (0..40).map(|i| i as f64 * 1.5).collect();
        data.push(1e160);
        let (means, stds) = mixture(&data);
        assert!(!means.is_empty());
        assert!(
            means.iter().chain(&stds).all(|v| v.is_finite()),
            "{means:?} {stds:?}"
        );
    }

    #[test]
    fn mixture_finds_both_modes() {
        let mut data: Vec<f64> = (0..400)
            .map(|i| if i % 2 == 0 { 0.0 } else { 50.0 } + (i % 7) as f64 * 0.1)
            .collect();
        data.sort_by(f64::total_cmp);
        let (means, _) = mixture(&data);
        assert!(means.iter().any(|m| m.abs() < 1.0), "{means:?}");
        assert!(means.iter().any(|m| (m - 50.0).abs() < 1.0), "{means:?}");
    }
}
