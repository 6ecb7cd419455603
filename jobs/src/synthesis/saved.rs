//! Saved models: a fitted Gaussian copula, CTGAN or TVAE kept as a file (serde JSON, tagged
//! with its format version), and the sampler that draws rows from it without refitting,
//! optionally under conditions.
//!
//! The file holds what sampling needs (the copula's marginals and correlation; a network's
//! column encodings and generator or decoder weights), the output schema and the
//! constraints: never a training row. [`ModelFile::description`] says exactly which real
//! values it holds.
//!
//! Conditions: a copula meets every condition on its columns exactly (the conditional
//! copula). The conditioned columns go first in the Cholesky order; each one's latent normal
//! is then its own draw plus a fixed sum of the draws before, so drawing that draw from the
//! normal truncated to where the latent lands in the asked-for interval (a level's, or the
//! values that round to a number) samples the model's joint distribution given them all.
//! CTGAN's generator takes one level as its condition vector, as it was trained to. Every
//! other condition (a further one of CTGAN, any of TVAE, `null`, combined columns) is met by
//! rejection, which fails, naming the columns, when fewer than 1 % of the rows meet them.
//! Dates and datetimes are asked as text and read as the numbers learned.

use polars::prelude::{DataType, TimeUnit, TimeZone};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::saved_models::ModelColumn;

use super::{
    constraints::{self, Columns, Constraint},
    copula::{finish_number, Marginal},
    ctgan::Ctgan,
    encoding::Encoder,
    on_one_thread,
    profile::{quantile, ColumnProfile, Role},
    stats::{cholesky, identity, nearest_correlation, normal_quantile, NormalTable},
    table::{Column, Table, Values},
    tvae::Tvae,
};
use crate::JobError;

pub use contracts::sample::ConditionMap;

/// The format tags of the files this build writes and reads: a copula's, CTGAN's, TVAE's.
pub const FORMAT: &str = "conveyor.gaussian_copula.v1";
pub const CTGAN_FORMAT: &str = "conveyor.ctgan.v1";
pub const TVAE_FORMAT: &str = "conveyor.tvae.v1";

/// Rows per block of the sampler: each block has its own seeded generator (Xoshiro256++, rand's
/// SmallRng: fast, and inlined into this loop), so the output depends on the seed alone, not
/// on how many threads drew it.
const BLOCK: usize = 8192;

/// Latent normals are clamped to this many standard deviations (as the fit's sampler clamps
/// u to [1e-12, 1 − 1e-12]).
const Z_LIMIT: f64 = NormalTable::LIMIT;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelFile {
    pub format: String,
    /// ε of a private fit.
    pub epsilon: Option<f64>,
    /// The columns generated, in output order.
    pub columns: Vec<OutputColumn>,
    /// The model's columns, in its order (a fixed combination is one joint column).
    pub learned: Vec<String>,
    #[serde(flatten)]
    pub fitted: Fitted,
    pub constraints: Vec<Constraint>,
}

/// What was fitted, as sampling needs it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Fitted {
    Copula {
        marginals: Vec<Marginal>,
        /// Correlation of the latent normals, row-major.
        correlation: Vec<f64>,
    },
    Network {
        network: Network,
        /// Each learned column's training range where the fit clamped its samples (numbers
        /// that are not categorical), so that a saved model's rows stay where the fit's did.
        ranges: Vec<Option<(f64, f64)>>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    Ctgan(Ctgan),
    Tvae(Tvae),
}

impl Fitted {
    /// The format tag of a file holding this.
    fn format(&self) -> &'static str {
        match self {
            Fitted::Copula { .. } => FORMAT,
            Fitted::Network {
                network: Network::Ctgan(_),
                ..
            } => CTGAN_FORMAT,
            Fitted::Network {
                network: Network::Tvae(_),
                ..
            } => TVAE_FORMAT,
        }
    }
}

impl Network {
    fn encoders(&self) -> &[Encoder] {
        match self {
            Network::Ctgan(ctgan) => ctgan.encoders(),
            Network::Tvae(tvae) => tvae.encoders(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputColumn {
    pub name: String,
    /// Its type in the training data, as [`stored_type`] writes it.
    pub dtype: String,
    pub role: Role,
    /// Numbers (integers, floats, dates and times) or labels.
    pub numbers: bool,
}

impl ModelFile {
    /// The file of a model fitted on `input` (whose columns `profiles` describe).
    pub fn new(
        input: &Table,
        profiles: &[ColumnProfile],
        learned: Vec<String>,
        fitted: Fitted,
        constraints: &[Constraint],
        epsilon: Option<f64>,
    ) -> ModelFile {
        let columns = input
            .columns
            .iter()
            .zip(profiles)
            .filter(|(_, p)| p.role != Role::Skip)
            .map(|(column, p)| OutputColumn {
                name: column.name.clone(),
                dtype: stored_type(&column.dtype),
                role: p.role,
                numbers: matches!(column.values, Values::Numbers(_)),
            })
            .collect();
        ModelFile {
            format: fitted.format().into(),
            epsilon,
            columns,
            learned,
            fitted,
            constraints: constraints.to_vec(),
        }
    }

    /// The synthesizer's name, as payloads spell it.
    pub fn synthesizer(&self) -> &'static str {
        match &self.fitted {
            Fitted::Copula { .. } => "gaussian_copula",
            Fitted::Network {
                network: Network::Ctgan(_),
                ..
            } => "ctgan",
            Fitted::Network {
                network: Network::Tvae(_),
                ..
            } => "tvae",
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a model serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ModelFile, String> {
        #[derive(Deserialize)]
        struct Tag {
            format: String,
        }
        let tag: Tag = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if ![FORMAT, CTGAN_FORMAT, TVAE_FORMAT].contains(&tag.format.as_str()) {
            return Err(format!(
                "the model is in format {:?}; this build reads {FORMAT:?}, {CTGAN_FORMAT:?} \
                 and {TVAE_FORMAT:?}",
                tag.format
            ));
        }
        let model: ModelFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if model.fitted.format() != tag.format {
            return Err(format!("a {:?} file holds another model", tag.format));
        }
        if !model.fits() {
            return Err("the model's parts do not fit its columns".into());
        }
        Ok(model)
    }

    /// Whether the parts hold what sampling reads: one per learned column, each whole.
    fn fits(&self) -> bool {
        let d = self.learned.len();
        match &self.fitted {
            Fitted::Copula {
                marginals,
                correlation,
            } => {
                marginals.len() == d
                    && correlation.len() == d * d
                    && marginals.iter().all(|m| match m {
                        Marginal::Continuous { knots, .. } => !knots.is_empty(),
                        Marginal::Discrete { levels, cumulative } => {
                            !cumulative.is_empty() && cumulative.len() == levels.len()
                        }
                    })
            }
            Fitted::Network { network, ranges } => {
                network.encoders().len() == d && ranges.len() == d
            }
        }
    }

    /// What the model is and exactly which real values it holds.
    pub fn description(&self) -> String {
        let learned = |discrete: bool| -> Vec<String> {
            let names = self.learned.iter().enumerate();
            names
                .filter(|&(at, _)| self.levels_at(at).is_some() == discrete)
                .map(|(_, name)| format!("{name:?}"))
                .collect()
        };
        let list = |names: Vec<String>| match names.is_empty() {
            true => "none".to_owned(),
            false => names.join(", "),
        };
        let identifiers: Vec<String> = self
            .columns
            .iter()
            .filter(|c| c.role == Role::Identifier)
            .map(|c| format!("{:?}", c.name))
            .collect();
        let identifiers = format!(
            "Identifier columns ({}) hold nothing: sampled identifiers count from 1, or are \
             syn-<n> labels.",
            list(identifiers)
        );
        let (continuous, discrete) = (list(learned(false)), list(learned(true)));
        let n = self.learned.len();
        let network = match &self.fitted {
            Fitted::Network { network, .. } => network,
            Fitted::Copula { .. } => {
                let head = format!(
                    "A Gaussian copula over {n} column(s): one marginal distribution per column \
                     and the correlation matrix of their normal scores. It holds no training \
                     row. {identifiers}"
                );
                return match self.epsilon {
                    Some(epsilon) => format!(
                        "{head} Fitted with ε-differential privacy (ε = {epsilon}): it holds no \
                         value of the data beyond what the private mechanisms released (noisy \
                         histograms over declared or privately estimated bounds, levels \
                         declared or kept above a noisy threshold, noisy Kendall's tau \
                         correlations); see privacy.budget."
                    ),
                    None => format!(
                        "{head} Not differentially private; the real values it holds: for each \
                         continuous column ({continuous}), 1001 quantile knots (its minimum, its \
                         maximum and the value at every 0.1 % of its distribution, \
                         interpolated between training values; with fewer than 1001 training \
                         rows some knots are training values themselves); for each categorical \
                         or few-valued column ({discrete}), every value seen in training with \
                         its frequency. Sampled values stay within each column's training range."
                    ),
                };
            }
        };
        let (what, frequencies) = match network {
            Network::Ctgan(_) => (
                format!(
                    "A CTGAN over {n} column(s): its generator network's weights (the critic is \
                 not kept) and each column's encoding"
                ),
                "in order of frequency, with its frequency (the generator's conditions are \
                 drawn by them; levels beyond the 99 most frequent with their exact counts)",
            ),
            Network::Tvae(_) => (
                format!(
                    "A TVAE over {n} column(s): its decoder network's weights and noise scales \
                 (the encoder network is not kept) and each column's encoding"
                ),
                "in order of frequency (levels beyond the 99 most frequent with their exact \
                 training counts)",
            ),
        };
        format!(
            "{what}. It holds no training row as such, but it is not differentially private: a \
             network is fitted to its training rows and can learn to reproduce some of them \
             (the fitting job's privacy report measures how close its samples come). \
             {identifiers} The real values it holds: for each continuous column \
             ({continuous}), the means and spreads of up to 5 mixture modes fitted to its \
             values, and its training minimum and maximum (sampled values are clamped to \
             them); for each categorical or few-valued column ({discrete}), every value seen \
             in training {frequencies}."
        )
    }

    /// The columns as the API shows them, with the levels a condition may ask for.
    pub fn schema(&self) -> Vec<ModelColumn> {
        self.columns
            .iter()
            .map(|c| {
                // A date's levels as dates: what a condition asks for.
                let shown = |value: Value| {
                    let text = value
                        .as_f64()
                        .and_then(|n| contracts::sample::temporal_text(&c.dtype, n));
                    text.map_or(value, Value::String)
                };
                let column = ModelColumn {
                    name: c.name.clone(),
                    data_type: c.dtype.clone(),
                    role: serde_json::to_value(c.role)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    levels: None,
                    more_levels: false,
                };
                match self.levels(&c.name) {
                    Some((_, levels)) => {
                        column.with_levels((0..levels.len()).map(|k| shown(level_value(levels, k))))
                    }
                    None => column,
                }
            })
            .collect()
    }

    /// The longest level of each discrete learned column: what a sampled row copies.
    pub fn longest_labels(&self) -> Vec<u64> {
        (0..self.learned.len())
            .filter_map(|at| self.levels_at(at))
            .map(Values::longest_label)
            .collect()
    }

    /// The learned column of that name when it is discrete (categorical or few-valued): its
    /// index and the levels it generates.
    fn levels(&self, name: &str) -> Option<(usize, &Values)> {
        let at = self.learned.iter().position(|n| n == name)?;
        Some((at, self.levels_at(at)?))
    }

    fn levels_at(&self, at: usize) -> Option<&Values> {
        match &self.fitted {
            Fitted::Copula { marginals, .. } => match marginals.get(at)? {
                Marginal::Discrete { levels, .. } => Some(levels),
                Marginal::Continuous { .. } => None,
            },
            Fitted::Network { network, .. } => match network.encoders().get(at)? {
                Encoder::Discrete { levels, .. } => Some(levels),
                Encoder::Continuous { .. } => None,
            },
        }
    }
}

fn level_value(levels: &Values, k: usize) -> Value {
    match levels {
        Values::Labels(v) => v[k].clone().map_or(Value::Null, Value::String),
        Values::Numbers(v) => v[k].map_or(Value::Null, Value::from),
    }
}

/// A polars type as the model file keeps it.
pub fn stored_type(dtype: &DataType) -> String {
    match dtype {
        DataType::Datetime(unit, Some(zone)) => format!("datetime[{unit}, {zone}]"),
        other => other.to_string(),
    }
}

/// The polars type [`stored_type`] wrote; an unknown one reads as f64 or text.
fn read_type(stored: &str, numbers: bool) -> DataType {
    let units = [
        TimeUnit::Nanoseconds,
        TimeUnit::Microseconds,
        TimeUnit::Milliseconds,
    ];
    let plain = [
        DataType::Boolean,
        DataType::UInt32,
        DataType::UInt64,
        DataType::Int32,
        DataType::Int64,
        DataType::Float32,
        DataType::Float64,
        DataType::String,
        DataType::Date,
        DataType::Time,
    ];
    let temporal = units
        .iter()
        .flat_map(|&u| [DataType::Datetime(u, None), DataType::Duration(u)]);
    if let Some(found) = plain
        .into_iter()
        .chain(temporal)
        .find(|d| stored_type(d) == stored)
    {
        return found;
    }
    let zoned = stored
        .strip_prefix("datetime[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|rest| rest.split_once(", "));
    if let Some((unit, zone)) = zoned {
        let unit = units.into_iter().find(|u| u.to_string() == unit);
        if let (Some(unit), Ok(zone)) = (unit, TimeZone::opt_try_new(Some(zone))) {
            return DataType::Datetime(unit, zone);
        }
    }
    if numbers {
        DataType::Float64
    } else {
        DataType::String
    }
}

/// How one latent normal becomes a column's value.
enum Mapper<'m> {
    Continuous {
        knots: &'m [f64],
        missing: f64,
        decimals: Option<u32>,
        bounds: (Option<f64>, Option<f64>),
    },
    /// Level k covers latent values up to `thresholds[k]` (Φ⁻¹ of its cumulative share).
    Discrete {
        thresholds: Vec<f64>,
        levels: &'m Values,
    },
}

/// One group's draw.
enum Plan {
    Copula(CopulaPlan),
    /// A network's rows, CTGAN's all given one (condition, slot) when conditioned exactly.
    Network {
        given: Option<(usize, usize)>,
    },
}

/// The copula's columns in `order`, the Cholesky factor of their correlation in that order,
/// and the conditions met exactly, on the first columns of that order.
struct CopulaPlan {
    order: Vec<usize>,
    cholesky: Vec<f64>,
    given: Vec<Given>,
    /// The conditioned columns' names, in that order, for a refusal.
    names: Vec<String>,
}

/// A condition met exactly: the interval of u (of the column's uniform score; a point when
/// `lo == hi`) that holds the value asked for, and that value.
#[derive(Clone, Copy)]
struct Given {
    lo: f64,
    hi: f64,
    value: Held,
}

/// The value a condition asks of a learned column: a discrete column's level, or a number.
#[derive(Clone, Copy)]
enum Held {
    Level(u32),
    Number(f64),
}

/// Draws rows from a saved model.
pub struct Sampler<'m> {
    model: &'m ModelFile,
    mappers: Vec<Mapper<'m>>,
    /// The output columns with no values: what `constraints::separate` reads types from.
    shape: Table,
    seed: u64,
    /// Blocks drawn so far: each block's generator is seeded from the seed and its number.
    blocks: u64,
    /// Rows sampled so far: fresh identifiers count on across calls.
    rows_out: usize,
}

impl<'m> Sampler<'m> {
    pub fn new(model: &'m ModelFile, seed: u64) -> Sampler<'m> {
        let marginals = match &model.fitted {
            Fitted::Copula { marginals, .. } => marginals.as_slice(),
            Fitted::Network { .. } => &[],
        };
        let mappers = marginals
            .iter()
            .map(|m| match m {
                Marginal::Continuous {
                    knots,
                    missing,
                    decimals,
                    bounds,
                } => Mapper::Continuous {
                    knots,
                    missing: *missing,
                    decimals: *decimals,
                    bounds: *bounds,
                },
                Marginal::Discrete { levels, cumulative } => Mapper::Discrete {
                    thresholds: cumulative[..cumulative.len().saturating_sub(1)]
                        .iter()
                        .map(|&c| normal_quantile(c))
                        .collect(),
                    levels,
                },
            })
            .collect();
        let shape = Table {
            columns: model
                .columns
                .iter()
                .map(|c| Column {
                    name: c.name.clone(),
                    dtype: read_type(&c.dtype, c.numbers),
                    values: empty(c.numbers),
                })
                .collect(),
        };
        Sampler {
            model,
            mappers,
            shape,
            seed,
            blocks: 0,
            rows_out: 0,
        }
    }

    /// `rows` rows meeting `conditions`, as output columns in the model's order.
    pub fn sample(&mut self, rows: usize, conditions: &ConditionMap) -> Result<Table, JobError> {
        let (plan, rejected) = self.plan(conditions)?;
        let first = self.draw(&plan, rows)?;
        let model = self.model;
        let rules = &model.constraints;
        let checked = rules.iter().any(Constraint::is_numeric) || !rejected.is_empty();
        let accept = |columns: &Columns| -> Result<Vec<usize>, JobError> {
            let mut rows = match checked {
                true => constraints::kept_rows(columns, rules)?,
                false => (0..columns.first().map_or(0, |c| c.1.len())).collect(),
            };
            for (name, wanted) in &rejected {
                let values = &columns
                    .iter()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| {
                        JobError::Permanent(format!("the model does not generate {name:?}"))
                    })?
                    .1;
                rows.retain(|&row| holds(values, row, wanted));
            }
            Ok(rows)
        };
        let refusal = |accepted: usize, drawn: usize| {
            let names: Vec<String> = rejected.iter().map(|(n, _)| format!("{n:?}")).collect();
            let what = match names.is_empty() {
                true => "the model's constraints".to_owned(),
                false => format!("the conditions on {}", names.join(", ")),
            };
            format!(
                "{what} held on {accepted} of {drawn} sampled rows, under 1 %: the model \
                 (almost) never generates such rows. Condition on values it generates often"
            )
        };
        let sampled = {
            let mut draw = |n: usize| self.draw(&plan, n);
            constraints::accept_rounds(rows, first, &mut draw, accept, refusal)?
        };
        Ok(self.assemble(sampled, rows))
    }

    /// The plan for `conditions`, and those it leaves to rejection.
    fn plan(&self, conditions: &ConditionMap) -> Result<(Plan, Vec<(String, Value)>), JobError> {
        let model = self.model;
        // What each condition asks of a learned column; the rest are left to rejection.
        let mut asked: Vec<(usize, Held, Value)> = Vec::new();
        let mut rejected = Vec::new();
        for (name, wanted) in conditions {
            let wanted = &self.physical(name, wanted)?;
            let at = model.learned.iter().position(|n| n == name);
            match (at, at.and_then(|at| model.levels_at(at)), wanted.as_f64()) {
                (Some(at), Some(levels), _) => {
                    let k = (0..levels.len())
                        .find(|&k| contracts::sample::same_value(&level_value(levels, k), wanted))
                        // Preflight refuses this, unless the model changed since.
                        .ok_or_else(|| {
                            JobError::Permanent(format!(
                                "the model never generates {wanted} in {name:?}"
                            ))
                        })?;
                    asked.push((at, Held::Level(k as u32), wanted.clone()));
                }
                (Some(at), None, Some(number)) => {
                    asked.push((at, Held::Number(number), wanted.clone()))
                }
                _ if model.columns.iter().any(|c| c.name == *name) => {
                    rejected.push((name.clone(), wanted.clone()))
                }
                _ => {
                    return Err(JobError::Permanent(format!(
                        "the model has no column {name:?}"
                    )))
                }
            }
        }
        let plan = match &model.fitted {
            // A copula meets them all exactly.
            Fitted::Copula {
                marginals,
                correlation,
            } => {
                let mut given = asked
                    .iter()
                    .map(|(at, held, _)| {
                        Ok((*at, Given::of(&marginals[*at], *held, &model.learned[*at])?))
                    })
                    .collect::<Result<Vec<(usize, Given)>, JobError>>()?;
                // Narrowest first: the fewer draws the later conditions reject.
                given.sort_by(|a, b| (a.1.hi - a.1.lo).total_cmp(&(b.1.hi - b.1.lo)));
                let d = model.learned.len();
                let first: Vec<usize> = given.iter().map(|g| g.0).collect();
                let order: Vec<usize> = first
                    .iter()
                    .copied()
                    .chain((0..d).filter(|i| !first.contains(i)))
                    .collect();
                let permuted: Vec<f64> = order
                    .iter()
                    .flat_map(|&i| order.iter().map(move |&j| correlation[i * d + j]))
                    .collect();
                let cholesky = cholesky(&permuted, d)
                    .or_else(|| cholesky(&nearest_correlation(&permuted, d, 1e-6), d))
                    .unwrap_or_else(|| identity(d));
                Plan::Copula(CopulaPlan {
                    order,
                    cholesky,
                    names: first.iter().map(|&at| model.learned[at].clone()).collect(),
                    given: given.into_iter().map(|g| g.1).collect(),
                })
            }
            // CTGAN meets its first level with a slot of its own exactly; TVAE none.
            Fitted::Network { network, .. } => {
                let ctgan = match network {
                    Network::Ctgan(ctgan) => Some(ctgan),
                    Network::Tvae(_) => None,
                };
                let mut exact = None;
                for (at, held, wanted) in asked {
                    let slot = match (ctgan, held) {
                        (Some(ctgan), Held::Level(k)) if exact.is_none() => {
                            ctgan.condition_of(at, k as usize)
                        }
                        _ => None,
                    };
                    match slot {
                        Some(slot) => exact = Some(slot),
                        None => rejected.push((model.learned[at].clone(), wanted)),
                    }
                }
                Plan::Network { given: exact }
            }
        };
        Ok((plan, rejected))
    }

    /// A condition on a date or time column (RFC 3339 text) as the number the model learned;
    /// any other condition as it is.
    fn physical(&self, name: &str, wanted: &Value) -> Result<Value, JobError> {
        let column = self.model.columns.iter().find(|c| c.name == name);
        match column.map(|c| contracts::sample::temporal(&c.dtype, wanted)) {
            Some(Some(Ok(number))) => Ok(Value::from(number)),
            Some(Some(Err(problem))) => Err(JobError::Permanent(format!("{name:?}: {problem}"))),
            _ => Ok(wanted.clone()),
        }
    }

    /// `rows` rows of the model's columns (fixed combinations taken apart).
    fn draw(&mut self, plan: &Plan, rows: usize) -> Result<Columns, JobError> {
        let columns = match plan {
            Plan::Copula(plan) => self.draw_copula(plan, rows)?,
            Plan::Network { given } => {
                let Fitted::Network { network, ranges } = &self.model.fitted else {
                    unreachable!("a network's plan")
                };
                // One seed per call, from the sampler's seed and the calls before.
                let seed = block_seed(self.seed, self.blocks);
                self.blocks += 1;
                let mut sampled = on_one_thread(|| match (network, given) {
                    (Network::Ctgan(ctgan), Some(given)) => ctgan.sample_given(rows, seed, *given),
                    (Network::Ctgan(ctgan), None) => ctgan.sample(rows, seed),
                    (Network::Tvae(tvae), _) => tvae.sample(rows, seed),
                })?;
                for (values, range) in sampled.iter_mut().zip(ranges) {
                    if let Some(range) = range {
                        super::clamp(values, *range);
                    }
                }
                sampled
            }
        };
        Ok(constraints::separate(
            self.model.learned.clone(),
            columns,
            &self.model.constraints,
            &self.shape,
        ))
    }

    /// `rows` rows of the copula's columns, in parallel blocks.
    fn draw_copula(&mut self, plan: &CopulaPlan, rows: usize) -> Result<Vec<Values>, JobError> {
        let blocks = rows.div_ceil(BLOCK);
        let first_block = self.blocks;
        self.blocks += blocks as u64;
        let seed = self.seed;
        let parts: Vec<Vec<Values>> = (0..blocks)
            .into_par_iter()
            .map(|b| {
                let n = BLOCK.min(rows - b * BLOCK);
                let mut rng = SmallRng::seed_from_u64(block_seed(seed, first_block + b as u64));
                self.draw_block(plan, n, &mut rng)
            })
            .collect::<Result<_, JobError>>()?;
        let mut columns: Vec<Values> = self
            .mappers
            .iter()
            .map(|m| match m {
                Mapper::Continuous { .. } => Values::Numbers(Vec::with_capacity(rows)),
                Mapper::Discrete { levels, .. } => empty(matches!(levels, Values::Numbers(_))),
            })
            .collect();
        for part in parts {
            for (all, more) in columns.iter_mut().zip(part) {
                all.append(more);
            }
        }
        Ok(columns)
    }

    fn draw_block(
        &self,
        plan: &CopulaPlan,
        n: usize,
        rng: &mut SmallRng,
    ) -> Result<Vec<Values>, JobError> {
        let d = self.mappers.len();
        let normal = NormalTable::shared();
        let mut numbers: Vec<Vec<Option<f64>>> = vec![Vec::new(); d];
        let mut codes: Vec<Vec<u32>> = vec![Vec::new(); d];
        for (i, mapper) in self.mappers.iter().enumerate() {
            match mapper {
                Mapper::Continuous { .. } => numbers[i].reserve_exact(n),
                Mapper::Discrete { .. } => codes[i].reserve_exact(n),
            }
        }
        // Each given column's interval of z.
        let intervals: Vec<(f64, f64)> = plan
            .given
            .iter()
            .map(|g| (normal.quantile(g.lo), normal.quantile(g.hi)))
            .collect();
        let mut e = vec![0.0; d];
        // Draws of the conditioned columns, kept or not: under 1 % kept, the conditions
        // (almost) never hold together.
        let most = 100 * n + 100;
        let mut draws = 0;
        for _ in 0..n {
            loop {
                draws += 1;
                if draws > most {
                    return Err(JobError::Permanent(format!(
                        "the conditions on {} held together on under 1 % of {most} draws: \
                         the model (almost) never generates such rows",
                        plan.names.join(", ")
                    )));
                }
                normals(&mut e, rng);
                if self.condition(plan, &intervals, &mut e, rng) {
                    break;
                }
            }
            for (p, &column) in plan.order.iter().enumerate() {
                let factor = &plan.cholesky[p * d..p * d + p + 1];
                if let Some(given) = plan.given.get(p) {
                    match given.value {
                        Held::Level(level) => codes[column].push(level),
                        Held::Number(number) => numbers[column].push(Some(number)),
                    }
                    continue;
                }
                let z: f64 = factor.iter().zip(&e).map(|(l, e)| l * e).sum();
                let z = z.clamp(-Z_LIMIT, Z_LIMIT);
                match &self.mappers[column] {
                    Mapper::Continuous {
                        knots,
                        missing,
                        decimals,
                        bounds,
                    } => {
                        let value =
                            (*missing == 0.0 || rng.random::<f64>() >= *missing).then(|| {
                                finish_number(quantile(knots, normal.cdf(z)), *decimals, *bounds)
                            });
                        numbers[column].push(value);
                    }
                    Mapper::Discrete { thresholds, .. } => {
                        codes[column].push(thresholds.partition_point(|&t| t < z) as u32);
                    }
                }
            }
        }
        Ok(self
            .mappers
            .iter()
            .zip(numbers.into_iter().zip(codes))
            .map(|(mapper, (numbers, codes))| match mapper {
                Mapper::Continuous { .. } => Values::Numbers(numbers),
                Mapper::Discrete { levels, .. } => take_levels(levels, &codes),
            })
            .collect())
    }

    /// Draws the conditioned columns' innovations `e[..g]` in place: each from the normal
    /// truncated to where its latent value z = s + l·e (s fixed by the draws before) meets its
    /// condition. That is exact for the first; a later one must also weigh the row by the
    /// mass its interval had given the draws before, so the row is kept with that mass over
    /// its largest (the interval centred on s): rejection sampling, exact for any number of
    /// conditions. True when the row is kept.
    fn condition(
        &self,
        plan: &CopulaPlan,
        intervals: &[(f64, f64)],
        e: &mut [f64],
        rng: &mut SmallRng,
    ) -> bool {
        let normal = NormalTable::shared();
        let d = self.mappers.len();
        let mut keep = 1.0;
        for (p, &(a, b)) in intervals.iter().enumerate() {
            let factor = &plan.cholesky[p * d..p * d + p + 1];
            let s: f64 = factor[..p].iter().zip(e.iter()).map(|(l, e)| l * e).sum();
            let l = factor[p].max(1e-9);
            let (alpha, beta) = ((a - s) / l, (b - s) / l);
            let (lo, hi) = (normal.cdf(alpha), normal.cdf(beta));
            if p > 0 {
                let half = (beta - alpha) / 2.0;
                keep *= match half < 1e-6 {
                    // A point: the density there over the largest, φ(0).
                    true => (-0.5 * (alpha + half).powi(2)).exp(),
                    false => (hi - lo) / (2.0 * normal.cdf(half) - 1.0),
                };
            }
            e[p] = normal.quantile(lo + (hi - lo) * rng.random::<f64>());
        }
        keep >= 1.0 || rng.random::<f64>() < keep
    }
    /// The output table: sampled columns in the model's order, fresh identifiers (counting
    /// from 1, or `syn-<n>`, on from the rows sampled before).
    fn assemble(&mut self, mut sampled: Columns, rows: usize) -> Table {
        let mut columns = Vec::with_capacity(self.shape.columns.len());
        let numbers = self.rows_out + 1..self.rows_out + rows + 1;
        self.rows_out += rows;
        for (column, shape) in self.model.columns.iter().zip(&self.shape.columns) {
            let values = match sampled.iter().position(|(name, _)| *name == column.name) {
                Some(at) => sampled.swap_remove(at).1,
                None if column.numbers => {
                    Values::Numbers(numbers.clone().map(|n| Some(n as f64)).collect())
                }
                None => Values::Labels(numbers.clone().map(|n| Some(format!("syn-{n}"))).collect()),
            };
            columns.push(Column {
                values,
                ..shape.clone()
            });
        }
        Table { columns }
    }
}

impl Given {
    /// How a copula meets `held` in a column with this marginal exactly, or why no row can hold it.
    fn of(marginal: &Marginal, held: Held, name: &str) -> Result<Given, JobError> {
        let never = |why: String| JobError::Permanent(format!("no row can have {why} in {name:?}"));
        let (lo, hi) = match (marginal, held) {
            (Marginal::Discrete { cumulative, .. }, Held::Level(k)) => {
                let k = k as usize;
                let lo = if k == 0 { 0.0 } else { cumulative[k - 1] };
                if cumulative[k] <= lo {
                    return Err(never("a level the model gives no probability".into()));
                }
                (lo, cumulative[k])
            }
            (
                Marginal::Continuous {
                    knots,
                    missing,
                    decimals,
                    bounds,
                },
                Held::Number(v),
            ) => {
                if *missing >= 1.0 {
                    return Err(never(format!("{v}: the column is always missing")));
                }
                if finish_number(v, *decimals, *bounds) != v {
                    let precision = match decimals {
                        Some(d) => format!("generated to {d} decimal(s) within its bounds"),
                        None => "generated within its bounds".into(),
                    };
                    return Err(never(format!("{v}: the column is {precision}")));
                }
                // The values that round to v.
                let half = decimals.map_or(0.0, |d| 0.5 / 10f64.powi(d as i32));
                let (first, last) = (knots[0], knots[knots.len() - 1]);
                if v + half < first || v - half > last {
                    return Err(never(format!(
                        "{v}: it is outside the range the model generates"
                    )));
                }
                // From below the values that round to v (a point mass at v included) to above them.
                (cdf(knots, v - half, false), cdf(knots, v + half, true))
            }
            _ => unreachable!("levels are asked of discrete marginals, numbers of continuous ones"),
        };
        Ok(Given {
            lo,
            hi,
            value: held,
        })
    }
}

/// The inverse of [`quantile`] over these knots: the probability of values up to `x`, with
/// the mass at `x` itself (a run of equal knots) or without it.
fn cdf(knots: &[f64], x: f64, with_x: bool) -> f64 {
    let n = knots.len();
    let above = knots.partition_point(|&k| if with_x { k <= x } else { k < x });
    match above {
        0 => 0.0,
        _ if above == n => 1.0,
        _ => {
            let below = above - 1;
            let within = (x - knots[below]) / (knots[above] - knots[below]);
            (below as f64 + within) / (n - 1) as f64
        }
    }
}

/// Whether the value at `row` is the one asked for.
fn holds(values: &Values, row: usize, wanted: &Value) -> bool {
    match (values, wanted) {
        (_, Value::Null) => match values {
            Values::Numbers(v) => v[row].is_none(),
            Values::Labels(v) => v[row].is_none(),
        },
        (Values::Numbers(v), Value::Number(n)) => v[row] == n.as_f64(),
        (Values::Labels(v), Value::String(s)) => v[row].as_deref() == Some(s.as_str()),
        (Values::Labels(v), Value::Bool(b)) => v[row].as_deref() == Some(&b.to_string()),
        _ => false,
    }
}

fn empty(numbers: bool) -> Values {
    match numbers {
        true => Values::Numbers(Vec::new()),
        false => Values::Labels(Vec::new()),
    }
}

fn take_levels(levels: &Values, codes: &[u32]) -> Values {
    match levels {
        Values::Numbers(l) => Values::Numbers(codes.iter().map(|&c| l[c as usize]).collect()),
        Values::Labels(l) => Values::Labels(codes.iter().map(|&c| l[c as usize].clone()).collect()),
    }
}

/// Fills `out` with standard normals, two per Box–Muller pair.
fn normals(out: &mut [f64], rng: &mut SmallRng) {
    for pair in out.chunks_mut(2) {
        let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let v: f64 = rng.random::<f64>();
        let radius = (-2.0 * u.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * v).sin_cos();
        pair[0] = radius * cos;
        if let Some(second) = pair.get_mut(1) {
            *second = radius * sin;
        }
    }
}

/// A block's seed: the job's seed and the block's number, mixed (SplitMix64's finalizer).
fn block_seed(seed: u64, block: u64) -> u64 {
    let mut z = seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthesis::{stats::standard_normal, synthesize, Quiet, SynthesisPayload};
    use polars::prelude::DataType;
    use serde_json::json;

    /// `id` unique text, `x` ~ N(50, 10) and `group` its tercile, `visits` few-valued.
    fn table(n: usize) -> Table {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut id, mut x, mut group, mut visits) = (vec![], vec![], vec![], vec![]);
        for i in 0..n {
            let a = standard_normal(&mut rng);
            id.push(Some(format!("person-{i}")));
            x.push(Some(((50.0 + 10.0 * a) * 1000.0).round() / 1000.0));
            let band = match a {
                a if a > 0.43 => "high",
                a if a > -0.43 => "mid",
                _ => "low",
            };
            group.push(Some(band.to_owned()));
            visits.push(Some((rng.random::<f64>() * 4.0).floor()));
        }
        Table {
            columns: vec![
                Column::labels("id", id),
                Column::numbers("x", DataType::Float64, x),
                Column::labels("group", group),
                Column::numbers("visits", DataType::Int64, visits),
            ],
        }
    }

    fn fit(input: &Table, extra: Value) -> ModelFile {
        let mut payload = json!({"dataset_id": uuid::Uuid::nil(), "rows": 10,
                                 "holdout_fraction": 0.0, "save_model": true});
        payload
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let payload: SynthesisPayload = serde_json::from_value(payload).unwrap();
        synthesize(input, &payload, 7, &Quiet)
            .unwrap()
            .model
            .unwrap()
    }

    fn conditions(value: Value) -> ConditionMap {
        serde_json::from_value(value).unwrap()
    }

    fn numbers<'t>(table: &'t Table, name: &str) -> &'t [Option<f64>] {
        match &table.column(name).unwrap().values {
            Values::Numbers(v) => v,
            Values::Labels(_) => panic!("{name} holds labels"),
        }
    }

    fn labels<'t>(table: &'t Table, name: &str) -> &'t [Option<String>] {
        match &table.column(name).unwrap().values {
            Values::Labels(v) => v,
            Values::Numbers(_) => panic!("{name} holds numbers"),
        }
    }

    fn mean_and_variance(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
        let values: Vec<f64> = values.collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, variance, n)
    }

    #[test]
    fn a_categorical_condition_samples_the_models_own_conditional_distribution() {
        let model = fit(&table(4000), json!({}));
        let high = conditions(json!({"group": "high"}));
        let conditioned = Sampler::new(&model, 1).sample(20_000, &high).unwrap();
        assert!(labels(&conditioned, "group")
            .iter()
            .all(|g| g.as_deref() == Some("high")));
        // The same model, unconditioned, then filtered to "high": the distribution the
        // condition must give (exactly, not approximately).
        let free = Sampler::new(&model, 2)
            .sample(200_000, &ConditionMap::new())
            .unwrap();
        let group = labels(&free, "group");
        let filtered = numbers(&free, "x")
            .iter()
            .zip(group)
            .filter(|(_, g)| g.as_deref() == Some("high"))
            .filter_map(|(x, _)| *x);
        let (expected, variance, n) = mean_and_variance(filtered);
        let (mean, variance_c, n_c) =
            mean_and_variance(numbers(&conditioned, "x").iter().flatten().copied());
        let tolerance = 4.0 * (variance / n + variance_c / n_c).sqrt();
        assert!(
            (mean - expected).abs() < tolerance,
            "{mean} vs {expected} ± {tolerance}"
        );
        // And it differs from the unconditioned mean: the condition carried through.
        assert!(mean > 60.0, "{mean}");
    }

    #[test]
    fn further_conditions_are_met_by_rejection_or_fail_naming_the_column() {
        let model = fit(&table(3000), json!({}));
        let both = conditions(json!({"group": "low", "visits": 2}));
        let sampled = Sampler::new(&model, 3).sample(500, &both).unwrap();
        assert!(labels(&sampled, "group")
            .iter()
            .all(|g| g.as_deref() == Some("low")));
        assert!(numbers(&sampled, "visits").iter().all(|v| *v == Some(2.0)));

        // A number finer than the column's precision, or beyond its range: no row has it.
        for (x, why) in [(50.123456, "to 3 decimal(s)"), (1e6, "outside the range")] {
            let never = conditions(json!({ "x": x }));
            let Err(JobError::Permanent(message)) = Sampler::new(&model, 3).sample(10, &never)
            else {
                panic!("a condition the model never meets must fail")
            };
            assert!(
                message.contains("\"x\"") && message.contains(why),
                "{message}"
            );
        }
        // A condition the model (almost) never meets by rejection.
        let null = conditions(json!({ "x": null }));
        let Err(JobError::Permanent(message)) = Sampler::new(&model, 3).sample(10, &null) else {
            panic!("x is never missing")
        };
        assert!(
            message.contains("\"x\"") && message.contains("under 1 %"),
            "{message}"
        );
        let unknown = conditions(json!({"group": "extreme"}));
        let Err(JobError::Permanent(message)) = Sampler::new(&model, 3).sample(10, &unknown) else {
            panic!()
        };
        assert!(message.contains("never generates"), "{message}");
    }

    #[test]
    fn the_seed_fixes_the_rows_whatever_the_number_of_threads() {
        let model = fit(&table(1000), json!({}));
        let draw = |seed: u64, threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut sampler = Sampler::new(&model, seed);
                let mut first = sampler
                    .sample(30_000, &conditions(json!({"group": "mid"})))
                    .unwrap();
                let second = sampler.sample(1000, &ConditionMap::new()).unwrap();
                for (column, more) in first.columns.iter_mut().zip(second.columns) {
                    column.values.append(more.values);
                }
                first
                    .columns
                    .into_iter()
                    .map(|c| c.values)
                    .collect::<Vec<_>>()
            })
        };
        let one = draw(4, 1);
        assert_eq!(one, draw(4, 4));
        assert_ne!(one, draw(5, 4));
        // Fresh identifiers count on across groups.
        let Values::Labels(ids) = &one[0] else {
            panic!()
        };
        assert_eq!(ids[30_000].as_deref(), Some("syn-30001"));
    }

    #[test]
    fn the_model_file_holds_no_training_row_and_says_which_values_it_holds() {
        let mut input = table(2000);
        // A value planted in the middle of x, and an identifier: neither may be in the file.
        let Values::Numbers(x) = &mut input.columns[1].values else {
            panic!()
        };
        x[100] = Some(51.987654321);
        let model = fit(&input, json!({}));
        let bytes = String::from_utf8(model.to_bytes()).unwrap();
        assert!(!bytes.contains("51.987654321"), "a training value leaked");
        assert!(!bytes.contains("person-"), "an identifier leaked");
        let description = model.description();
        assert!(
            description.contains("1001 quantile knots")
                && description.contains("continuous column (\"x\")")
                && description.contains("(\"group\", \"visits\")")
                && description.contains("Identifier columns (\"id\")"),
            "{description}"
        );
        let read = ModelFile::from_bytes(bytes.as_bytes()).unwrap();
        assert_eq!(read.learned, model.learned);
        let (
            Fitted::Copula {
                marginals: read, ..
            },
            Fitted::Copula { marginals, .. },
        ) = (&read.fitted, &model.fitted)
        else {
            panic!()
        };
        assert_eq!(read[1], marginals[1]);
        let (Marginal::Continuous { knots: a, .. }, Marginal::Continuous { knots: b, .. }) =
            (&read[0], &marginals[0])
        else {
            panic!()
        };
        assert!(a
            .iter()
            .zip(b)
            .all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs()));
        let schema = model.schema();
        assert_eq!(schema[2].levels.as_ref().unwrap().len(), 3);
        assert_eq!(schema[1].levels, None);

        // Under ε: nothing beyond the private releases, and the description says so.
        let private = fit(
            &input,
            json!({"epsilon": 1.0, "columns": {"x": {"min": 0, "max": 100}, "visits": {"min": 0, "max": 3}}}),
        );
        let bytes = String::from_utf8(private.to_bytes()).unwrap();
        assert!(!bytes.contains("51.987654321"));
        assert!(private.description().contains("ε-differential privacy"));
        assert!(!private.description().contains("quantile knots"));

        // Parts that do not fit the columns are refused, not sampled.
        let mut file: Value = serde_json::from_str(&bytes).unwrap();
        file["correlation"] = json!([1.0]);
        let short = serde_json::to_vec(&file).unwrap();
        assert!(ModelFile::from_bytes(&short)
            .unwrap_err()
            .contains("do not fit"));

        let wrong = bytes.replace(FORMAT, "conveyor.gaussian_copula.v0");
        let refused = ModelFile::from_bytes(wrong.as_bytes()).unwrap_err();
        assert!(refused.contains("this build reads"), "{refused}");
    }

    /// A network fitted briefly, saved and read back.
    fn network(input: &Table, synthesizer: &str) -> ModelFile {
        let fitted = fit(input, json!({"synthesizer": synthesizer, "epochs": 3}));
        assert_eq!(fitted.synthesizer(), synthesizer);
        ModelFile::from_bytes(&fitted.to_bytes()).unwrap()
    }

    #[test]
    fn a_saved_network_samples_as_the_fitted_one_and_meets_conditions() {
        let input = table(1500);
        for synthesizer in ["ctgan", "tvae"] {
            let fitted = fit(&input, json!({"synthesizer": synthesizer, "epochs": 3}));
            let read = ModelFile::from_bytes(&fitted.to_bytes()).unwrap();
            let none = ConditionMap::new();
            // The weights survive the file exactly: the same seed gives the same rows.
            let a = Sampler::new(&fitted, 5).sample(700, &none).unwrap();
            let b = Sampler::new(&read, 5).sample(700, &none).unwrap();
            let values = |t: &Table| {
                t.columns
                    .iter()
                    .map(|c| c.values.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(values(&a), values(&b), "{synthesizer}");
            assert_eq!(a.rows(), 700);
            // Numbers stay within the training range; identifiers are fresh.
            let (lo, hi) = crate::synthesis::range(&input.columns[1].values).unwrap();
            assert!(numbers(&a, "x")
                .iter()
                .flatten()
                .all(|&x| (lo..=hi).contains(&x)));
            assert_eq!(labels(&a, "id")[0].as_deref(), Some("syn-1"));

            // A categorical condition (exact in CTGAN, by rejection in TVAE) and a number.
            let wanted = conditions(json!({"group": "high", "visits": 2}));
            let given = Sampler::new(&read, 9).sample(400, &wanted).unwrap();
            assert_eq!(given.rows(), 400);
            assert!(labels(&given, "group")
                .iter()
                .all(|g| g.as_deref() == Some("high")));
            assert!(numbers(&given, "visits").iter().all(|&v| v == Some(2.0)));
            // A level it never generates, and a column it lacks, are refused.
            let never = Sampler::new(&read, 9).sample(10, &conditions(json!({"group": "top"})));
            assert!(matches!(never, Err(JobError::Permanent(m)) if m.contains("never generates")));
            let lacking = Sampler::new(&read, 9).sample(10, &conditions(json!({"zip": 1})));
            assert!(matches!(lacking, Err(JobError::Permanent(m)) if m.contains("no column")));
        }
    }

    #[test]
    fn a_saved_networks_rows_keep_its_constraints() {
        let mut input = table(1500);
        let x = numbers(&input, "x").to_vec();
        let above: Vec<Option<f64>> = x.iter().map(|v| v.map(|v| v + 5.0)).collect();
        input
            .columns
            .push(Column::numbers("y", DataType::Float64, above));
        let rule = json!({"constraints": [{"type": "inequality", "low": "x", "high": "y"}],
                          "synthesizer": "ctgan", "epochs": 2});
        let model = ModelFile::from_bytes(&fit(&input, rule).to_bytes()).unwrap();
        let sampled = Sampler::new(&model, 3)
            .sample(1000, &conditions(json!({"group": "low"})))
            .unwrap();
        let (x, y) = (numbers(&sampled, "x"), numbers(&sampled, "y"));
        assert!(x.iter().zip(y).all(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => x < y,
            _ => true,
        }));
    }

    #[test]
    fn a_network_file_holds_no_training_row_and_says_it_is_not_private() {
        let mut input = table(1500);
        let Values::Numbers(x) = &mut input.columns[1].values else {
            panic!()
        };
        x[100] = Some(51.987654321);
        for synthesizer in ["ctgan", "tvae"] {
            let model = network(&input, synthesizer);
            let bytes = String::from_utf8(model.to_bytes()).unwrap();
            assert!(!bytes.contains("51.987654321"), "a training value leaked");
            assert!(!bytes.contains("person-"), "an identifier leaked");
            assert!(bytes.contains(&format!("conveyor.{synthesizer}.v1")));
            let description = model.description();
            assert!(
                description.contains("not differentially private")
                    && description.contains("continuous column (\"x\")")
                    && description.contains("(\"group\", \"visits\")")
                    && description.contains("training minimum and maximum"),
                "{description}"
            );
            let schema = model.schema();
            assert_eq!(schema[2].levels.as_ref().unwrap().len(), 3);
            assert_eq!(schema[1].levels, None);
            // Weights that do not fit the columns are refused, not sampled.
            let key = if synthesizer == "ctgan" {
                "\"batch\":"
            } else {
                "\"width\":"
            };
            let broken = bytes.replacen(key, &format!("{key}9"), 1);
            assert!(
                ModelFile::from_bytes(broken.as_bytes()).is_err(),
                "{synthesizer}"
            );
            let mut file: Value = serde_json::from_str(&bytes).unwrap();
            file["ranges"] = json!([]);
            let short = serde_json::to_vec(&file).unwrap();
            assert!(
                ModelFile::from_bytes(&short).is_err(),
                "{synthesizer}: ranges"
            );
        }
    }

    #[test]
    fn a_number_or_a_date_is_met_exactly_with_the_models_own_conditional_distribution() {
        // `day`: a date, later for higher x.
        let mut input = table(4000);
        let days: Vec<Option<f64>> = numbers(&input, "x")
            .iter()
            .map(|x| x.map(|x| 19_700.0 + (x * 3.0).round()))
            .collect();
        input
            .columns
            .push(Column::numbers("day", DataType::Date, days));
        let model = fit(&input, json!({}));

        // x = 55.5 on every row; `group` as the model has it near 55.5 (a large free sample
        // filtered to x within 0.5 of it).
        let given = Sampler::new(&model, 1)
            .sample(20_000, &conditions(json!({"x": 55.5})))
            .unwrap();
        assert!(numbers(&given, "x").iter().all(|&x| x == Some(55.5)));
        let free = Sampler::new(&model, 2)
            .sample(300_000, &ConditionMap::new())
            .unwrap();
        let high = |table: &Table, keep: &dyn Fn(usize) -> bool| {
            let group = labels(table, "group");
            let kept: Vec<usize> = (0..table.rows()).filter(|&r| keep(r)).collect();
            let share = kept
                .iter()
                .filter(|&&r| group[r].as_deref() == Some("high"))
                .count() as f64
                / kept.len() as f64;
            (share, kept.len() as f64)
        };
        let x = numbers(&free, "x");
        let (expected, n) = high(&free, &|r| x[r].is_some_and(|x| (x - 55.5).abs() <= 0.5));
        let (share, n_given) = high(&given, &|_| true);
        let tolerance = 4.0 * (expected * (1.0 - expected) * (1.0 / n + 1.0 / n_given)).sqrt();
        assert!(
            (share - expected).abs() < tolerance + 0.01,
            "high: {share} given x = 55.5, {expected} near it in the model ± {tolerance}"
        );

        // A date with a level, both exact: every row, and the date as a date.
        let both = conditions(json!({"day": "2024-05-07", "group": "mid"}));
        let given = Sampler::new(&model, 3).sample(2000, &both).unwrap();
        let day = 19_850.0; // 2024-05-07
        assert!(numbers(&given, "day").iter().all(|&d| d == Some(day)));
        assert!(labels(&given, "group")
            .iter()
            .all(|g| g.as_deref() == Some("mid")));
        assert_eq!(given.column("day").unwrap().dtype, DataType::Date);
        // x follows: days are 19,700 + 3x in the data.
        let (mean, _, _) = mean_and_variance(numbers(&given, "x").iter().flatten().copied());
        assert!(
            (mean - (day - 19_700.0) / 3.0).abs() < 5.0,
            "x given the day: {mean}"
        );

        let bad = Sampler::new(&model, 3).sample(10, &conditions(json!({"day": "2024-02-30"})));
        assert!(matches!(bad, Err(JobError::Permanent(m)) if m.contains("YYYY-MM-DD")));
        // A few-valued date column lists its levels as dates.
        let mut input = table(500);
        let weeks = (0..500)
            .map(|i| Some(19_787.0 + 7.0 * (i % 3) as f64))
            .collect();
        input
            .columns
            .push(Column::numbers("week", DataType::Date, weeks));
        let schema = fit(&input, json!({})).schema();
        let week = schema.iter().find(|c| c.name == "week").unwrap();
        let levels = week.levels.clone().unwrap();
        assert!(levels.contains(&json!("2024-03-12")), "{levels:?}");
    }

    #[test]
    fn several_conditions_together_follow_the_models_joint_distribution() {
        // `band`: x's upper part, blurred, so that both conditions pull on x.
        let mut input = table(4000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let band = numbers(&input, "x")
            .iter()
            .map(|x| {
                let v = (x.unwrap() - 50.0) / 10.0 + 0.7 * standard_normal(&mut rng);
                Some(if v > 0.43 { "up" } else { "down" }.to_owned())
            })
            .collect();
        input.columns.push(Column::labels("band", band));
        let model = fit(&input, json!({}));
        let both = conditions(json!({"band": "up", "group": "high"}));
        let given = Sampler::new(&model, 4).sample(20_000, &both).unwrap();
        assert!(labels(&given, "band")
            .iter()
            .all(|b| b.as_deref() == Some("up")));
        assert!(labels(&given, "group")
            .iter()
            .all(|g| g.as_deref() == Some("high")));
        // The model's own rows with both, from a large free sample.
        let free = Sampler::new(&model, 5)
            .sample(300_000, &ConditionMap::new())
            .unwrap();
        let (band, group) = (labels(&free, "band"), labels(&free, "group"));
        let kept = numbers(&free, "x").iter().enumerate().filter(|(row, _)| {
            band[*row].as_deref() == Some("up") && group[*row].as_deref() == Some("high")
        });
        let (expected, variance, n) = mean_and_variance(kept.filter_map(|(_, x)| *x));
        let (mean, variance_c, n_c) =
            mean_and_variance(numbers(&given, "x").iter().flatten().copied());
        let tolerance = 4.0 * (variance / n + variance_c / n_c).sqrt();
        assert!(
            (mean - expected).abs() < tolerance,
            "x given both: {mean}, in the model's rows with both: {expected} ± {tolerance}"
        );
    }

    #[test]
    fn a_value_with_a_point_mass_is_drawn_over_its_whole_mass() {
        // 30 % zeros: the knots hold a run of zeros, and x = 0 covers all of it.
        let knots: Vec<f64> = (0..1001)
            .map(|i| if i < 300 { 0.0 } else { i as f64 })
            .collect();
        assert_eq!(cdf(&knots, 0.0, false), 0.0);
        assert!((cdf(&knots, 0.0, true) - 0.299).abs() < 1e-9);
        assert!((cdf(&knots, 500.0, true) - 0.5).abs() < 1e-9);
    }
}
