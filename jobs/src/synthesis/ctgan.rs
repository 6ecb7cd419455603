//! CTGAN (Xu et al., "Modeling Tabular Data using Conditional GAN", NeurIPS 2019) with candle
//! on the CPU, built as the reference implementation (sdv-dev/CTGAN) builds it:
//!
//! - rows encoded as TVAE's (`encoding.rs`): mode-specific normalisation of continuous
//!   columns, one-hot labels for discrete ones;
//! - a conditional generator: a condition vector (one discrete column's level) joins the
//!   noise. Training by sampling picks a discrete column uniformly, a level by its
//!   log-frequency and a real row holding it, and the generator pays cross-entropy when its
//!   output misses the level. Sampling draws conditions by the levels' real frequencies
//!   and each row keeps the level it asked for (the reference draws by the log-frequencies
//!   again and leaves the level to the generator, which flattens the shares);
//! - the generator: two residual blocks (linear, batch normalisation, ReLU, concatenated with
//!   the block's input), then tanh for offsets and Gumbel-softmax (τ = 0.2) for one-hots;
//! - a PacGAN critic (10 rows packed into one input): linear, LeakyReLU(0.2), dropout(0.5)
//!   twice, then linear; trained as a WGAN with gradient penalty (λ = 10). candle has no
//!   double backward, so the critic's gradient with respect to its input is written in closed
//!   form ([`input_gradient`]), a function of the weights that candle differentiates once;
//! - Adam (learning rate 2·10⁻⁴, β = (0.5, 0.9)) for both, batches of 500 (fewer rows on small
//!   tables, so that an epoch still takes a few steps).
//!
//! Weights, batches, noise, dropout masks and conditions all come from the seed: a seed gives
//! the same model.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Linear;
use rand::{
    rngs::{SmallRng, StdRng},
    RngCore, SeedableRng,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    activation::{self, Span},
    adam::{Adam, Settings},
    copula::ColumnSpec,
    encoding::{
        append_columns, decode, decoded_rows, encode_columns, laid_out, training_fits, Encoded,
        Encoder,
    },
    matmul::{dense, matmul},
    norm::batch_norm_relu,
    table::{Column, Values},
    tvae::layer,
    weights::{Floats, LayerFile},
    JobError, Monitor,
};

const LATENT: usize = 128;
const HIDDEN: usize = 256;
const BLOCKS: usize = 2;
/// Rows per critic input (PacGAN).
const PAC: usize = 10;
const BATCH: usize = 500;
/// The gradient penalty's weight.
const PENALTY: f64 = 10.0;
/// Gumbel-softmax temperature.
const TAU: f64 = 0.2;
/// LeakyReLU's slope below zero.
const SLOPE: f64 = 0.2;
/// The critic's dropout keeps a unit with probability ½ and doubles it (inverted dropout).
const KEPT: f32 = 2.0;

/// The weights of the generator and critic [`Ctgan::fit`] builds for rows `width` wide with
/// `conditional` one-hot slots: they grow with the square of the width.
fn weights(width: usize, conditional: usize) -> u64 {
    let (width, conditional) = (width as u64, conditional as u64);
    let hidden = HIDDEN as u64;
    let mut input = LATENT as u64 + conditional;
    let mut total = 0u64;
    for _ in 0..BLOCKS {
        total = total.saturating_add(input.saturating_mul(hidden) + 3 * hidden);
        input += hidden;
    }
    total = total.saturating_add(input.saturating_mul(width) + width);
    let packed = PAC as u64 * (width + conditional);
    total
        .saturating_add(packed.saturating_mul(hidden) + hidden)
        .saturating_add(hidden * hidden + hidden)
        .saturating_add(hidden + 1)
}

fn fail(e: candle_core::Error) -> JobError {
    JobError::Permanent(format!("ctgan: {e}"))
}

/// The bulk of the randomness (normals, Gumbel draws, dropout masks, row picks): rand's
/// `SmallRng` (xoshiro256++), seeded from the job's RNG, without a cryptographic generator's
/// cost per number; the draws below are built on its raw 64-bit outputs.
struct Fast(SmallRng);

impl Fast {
    fn new(rng: &mut StdRng) -> Fast {
        Fast(SmallRng::from_rng(rng))
    }

    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in (0, 1), never either end.
    fn open01(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.open01() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// Uniform in (0, 1) in single precision, never either end: 23 random bits (with a 24th
    /// bit the half would round the largest up to 1).
    fn open01_f32(&mut self) -> f32 {
        ((self.next() >> 41) as f32 + 0.5) * (1.0 / (1u32 << 23) as f32)
    }

    /// Standard normals (Box–Muller, both of each pair), in single precision: the networks'
    /// noise, where double precision's logarithms and sines cost a few percent of a step.
    fn normals(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let r = (-2.0 * self.open01_f32().ln()).sqrt();
            let (sin, cos) = (std::f32::consts::TAU * self.open01_f32()).sin_cos();
            out.push(r * cos);
            out.push(r * sin);
        }
        out.truncate(n);
        out
    }

    fn gumbels(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| -(-self.open01_f32().ln()).ln()).collect()
    }

    /// Dropout masks: 0 or [`KEPT`], one random bit each.
    fn dropout(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 64);
        while out.len() < n {
            let bits = self.next();
            out.extend((0..64).map(|i| if (bits >> i) & 1 == 1 { KEPT } else { 0.0 }));
        }
        out.truncate(n);
        out
    }
}

/// The index of the first cumulative share above `u`.
fn pick(cumulative: &[f64], u: f64) -> usize {
    cumulative
        .iter()
        .position(|&c| u < c)
        .unwrap_or(cumulative.len() - 1)
}

fn cumulative(weights: impl Iterator<Item = f64>) -> Vec<f64> {
    let weights: Vec<f64> = weights.collect();
    let total: f64 = weights.iter().sum::<f64>().max(1e-300);
    let mut sum = 0.0;
    weights
        .iter()
        .map(|w| {
            sum += w / total;
            sum
        })
        .collect()
}

/// A discrete column as condition vectors see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Condition {
    /// Its one-hot's start in an encoded row, and in the condition vector.
    at: usize,
    cond_at: usize,
    slots: usize,
    /// Cumulative shares of its slots: by real frequency (sampling), by log-frequency
    /// (training by sampling).
    real: Vec<f64>,
    log: Vec<f64>,
    /// The training rows holding each slot (emptied once trained).
    #[serde(skip)]
    rows: Vec<Vec<u32>>,
}

/// A batch's condition vectors (`n` × the condition width, one 1 in each) and the
/// (column, slot) each row asks for.
struct Conditions {
    vectors: Vec<f32>,
    picks: Vec<(usize, usize)>,
}

/// How a batch's conditions are drawn: a column uniformly, then a level by its
/// log-frequency (training by sampling) or its real frequency; or one level for every row.
#[derive(Clone, Copy)]
enum Asking {
    Training,
    Real,
    /// (condition, slot).
    Only(usize, usize),
}

fn ask(
    columns: &[Condition],
    width: usize,
    n: usize,
    asking: Asking,
    fast: &mut Fast,
) -> Conditions {
    let mut vectors = vec![0f32; n * width];
    let mut picks = Vec::with_capacity(n);
    if columns.is_empty() {
        return Conditions { vectors, picks };
    }
    for row in 0..n {
        let (k, slot) = match asking {
            Asking::Only(k, slot) => (k, slot),
            Asking::Training | Asking::Real => {
                let k = fast.below(columns.len());
                let shares = match asking {
                    Asking::Training => &columns[k].log,
                    _ => &columns[k].real,
                };
                (k, pick(shares, fast.open01()))
            }
        };
        let column = &columns[k];
        vectors[row * width + column.cond_at + slot] = 1.0;
        picks.push((k, slot));
    }
    Conditions { vectors, picks }
}

/// A residual block: linear, batch normalisation (batch statistics, as when sampling), ReLU.
#[derive(Clone, Debug)]
struct Block {
    linear: Linear,
    gamma: Tensor,
    beta: Tensor,
}

#[derive(Clone, Debug)]
struct Generator {
    blocks: Vec<Block>,
    out: Linear,
}

impl Generator {
    /// Raw outputs: offsets before tanh, logits before the softmaxes.
    fn forward(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = input.clone();
        for block in &self.blocks {
            let h = batch_norm_relu(&dense(&block.linear, &x)?, &block.gamma, &block.beta)?;
            x = Tensor::cat(&[&h, &x], 1)?;
        }
        dense(&self.out, &x)
    }
}

/// 1 where a unit is positive, [`SLOPE`] elsewhere: LeakyReLU's derivative, also its factor
/// (LeakyReLU(h) = h · slopes(h)). Carries no gradient.
fn slopes(h: &Tensor) -> candle_core::Result<Tensor> {
    let h = h.detach();
    h.gt(&h.zeros_like()?)?
        .to_dtype(h.dtype())?
        .affine(1.0 - SLOPE, SLOPE)
}

/// The critic on packed rows `x` with the given dropout masks of its two hidden layers: its
/// scores, and both layers' LeakyReLU slopes (for [`input_gradient`]).
fn critic(
    layers: &[Linear],
    x: &Tensor,
    masks: &[Tensor; 2],
) -> candle_core::Result<(Tensor, [Tensor; 2])> {
    let h1 = dense(&layers[0], x)?;
    let s1 = slopes(&h1)?;
    let a1 = ((h1 * &s1)? * &masks[0])?;
    let h2 = dense(&layers[1], &a1)?;
    let s2 = slopes(&h2)?;
    let a2 = ((h2 * &s2)? * &masks[1])?;
    Ok((dense(&layers[2], &a2)?, [s1, s2]))
}

/// ∂critic/∂x of each row, in closed form: with the slopes s and masks m of the forward pass,
/// ((w₃ ⊙ s₂ ⊙ m₂) W₂ ⊙ s₁ ⊙ m₁) W₁. A product of the weights with constants, so candle
/// differentiates it with respect to the weights: the gradient penalty's backward pass.
fn input_gradient(
    layers: &[Linear],
    slopes: &[Tensor; 2],
    masks: &[Tensor; 2],
) -> candle_core::Result<Tensor> {
    let g2 = (&slopes[1] * &masks[1])?.broadcast_mul(layers[2].weight())?;
    let g1 = ((matmul(&g2, layers[1].weight())? * &slopes[0])? * &masks[0])?;
    matmul(&g1, layers[0].weight())
}

/// λ · mean over rows of (‖∂critic/∂x‖ − 1)².
fn gradient_penalty(gradient: &Tensor) -> candle_core::Result<Tensor> {
    let norm = (gradient.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    (norm - 1.0)?.sqr()?.mean_all()? * PENALTY
}

#[derive(Clone, Debug)]
pub struct Ctgan {
    encoders: Vec<Encoder>,
    conditions: Vec<Condition>,
    cond_width: usize,
    generator: Generator,
    batch: usize,
}

/// Linear layers whose weights are variables, `sizes[i]` → `sizes[i + 1]`.
fn stack(
    sizes: &[usize],
    vars: &mut Vec<Var>,
    rng: &mut StdRng,
) -> candle_core::Result<Vec<Linear>> {
    let mut layers = Vec::new();
    for pair in sizes.windows(2) {
        let (linear, v) = layer(pair[0], pair[1], rng)?;
        layers.push(linear);
        vars.extend(v);
    }
    Ok(layers)
}

fn adam(vars: Vec<Var>) -> Adam {
    Adam::new(
        vars,
        Settings {
            lr: 2e-4,
            beta1: 0.5,
            beta2: 0.9,
            eps: 1e-8,
            weight_decay: 1e-6,
        },
    )
}

impl Ctgan {
    /// Raw generator outputs as the critic sees them: tanh for offsets, Gumbel-softmax (with
    /// the given Gumbel noise) for one-hots.
    fn activate(&self, raw: &Tensor, gumbel: &Tensor) -> candle_core::Result<Tensor> {
        let mut spans = Vec::with_capacity(2 * self.encoders.len());
        for encoder in &self.encoders {
            if let Encoder::Continuous { at, .. } = encoder {
                spans.push(Span::Tanh(*at));
            }
            let (start, len) = encoder.group();
            spans.push(Span::Softmax { start, len });
        }
        activation::activate(raw, gumbel, &spans, TAU as f32)
    }

    /// Cross-entropy of the conditioned columns' logits against the levels asked for, summed
    /// over the batch's rows and divided by its size (CTGAN's `_cond_loss`).
    fn condition_loss(
        &self,
        raw: &Tensor,
        picks: &[(usize, usize)],
    ) -> candle_core::Result<Tensor> {
        let targets: Vec<_> = picks
            .iter()
            .map(|&(k, slot)| {
                let condition = &self.conditions[k];
                (condition.at, condition.slots, slot)
            })
            .collect();
        activation::cross_entropy(raw, &targets)
    }

    /// The generator's input: noise, then the condition vectors.
    fn input(&self, n: usize, vectors: Vec<f32>, fast: &mut Fast) -> candle_core::Result<Tensor> {
        let noise = Tensor::from_vec(fast.normals(n * LATENT), (n, LATENT), &Device::Cpu)?;
        if self.cond_width == 0 {
            return Ok(noise);
        }
        let vectors = Tensor::from_vec(vectors, (n, self.cond_width), &Device::Cpu)?;
        Tensor::cat(&[&noise, &vectors], 1)
    }

    /// Activated rows with their condition vectors, packed for the critic.
    fn pack(&self, rows: &Tensor, vectors: &Tensor) -> candle_core::Result<Tensor> {
        let (n, width) = rows.dims2()?;
        let joined = match self.cond_width {
            0 => rows.clone(),
            _ => Tensor::cat(&[rows, vectors], 1)?,
        };
        joined.reshape((n / PAC, PAC * (width + self.cond_width)))
    }

    /// Trains for `epochs`, reporting each epoch's mean generator and critic losses; stops
    /// between epochs when asked.
    pub fn fit(
        columns: &[(&Column, ColumnSpec)],
        epochs: usize,
        seed: u64,
        monitor: &dyn Monitor,
    ) -> Result<Ctgan, JobError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut fast = Fast::new(&mut rng);
        let rows = columns.first().map_or(0, |(c, _)| c.values.len());
        let Encoded {
            encoders,
            width,
            data,
        } = encode_columns(columns, |encoders, width| {
            let conditional: usize = encoders
                .iter()
                .map(|e| match e {
                    Encoder::Discrete { slots, .. } => *slots,
                    Encoder::Continuous { .. } => 0,
                })
                .sum();
            training_fits(
                "CTGAN",
                weights(width, conditional),
                rows,
                width,
                monitor.memory_cap(),
            )
        })?;
        let mut conditions = Vec::new();
        let mut cond_width = 0;
        for encoder in &encoders {
            let Encoder::Discrete { at, slots, .. } = encoder else {
                continue;
            };
            let mut holding = vec![Vec::new(); *slots];
            for row in 0..rows {
                let one_hot = &data[row * width + at..row * width + at + slots];
                if let Some(slot) = one_hot.iter().position(|&v| v > 0.5) {
                    holding[slot].push(row as u32);
                }
            }
            let counts: Vec<f64> = holding.iter().map(|r| r.len() as f64).collect();
            conditions.push(Condition {
                at: *at,
                cond_at: cond_width,
                slots: *slots,
                real: cumulative(counts.iter().copied()),
                log: cumulative(counts.iter().map(|c| (c + 1.0).ln())),
                rows: holding,
            });
            cond_width += slots;
        }

        let device = Device::Cpu;
        let mut generator_vars = Vec::new();
        let mut blocks = Vec::new();
        let mut input = LATENT + cond_width;
        for _ in 0..BLOCKS {
            let (linear, v) = layer(input, HIDDEN, &mut rng).map_err(fail)?;
            generator_vars.extend(v);
            let gamma = Var::ones((1, HIDDEN), DType::F32, &device).map_err(fail)?;
            let beta = Var::zeros((1, HIDDEN), DType::F32, &device).map_err(fail)?;
            blocks.push(Block {
                linear,
                gamma: gamma.as_tensor().clone(),
                beta: beta.as_tensor().clone(),
            });
            generator_vars.extend([gamma, beta]);
            input += HIDDEN;
        }
        let (out, v) = layer(input, width, &mut rng).map_err(fail)?;
        generator_vars.extend(v);
        let mut critic_vars = Vec::new();
        let packed = PAC * (width + cond_width);
        let critic_layers =
            stack(&[packed, HIDDEN, HIDDEN, 1], &mut critic_vars, &mut rng).map_err(fail)?;
        let mut generator_optimizer = adam(generator_vars);
        let mut critic_optimizer = adam(critic_vars);
        // Small tables get smaller batches (a multiple of the pack), so that an epoch still
        // takes a few steps.
        let batch = BATCH.min((rows / 5).max(10 * PAC)) / PAC * PAC;
        let mut model = Ctgan {
            encoders,
            conditions,
            cond_width,
            generator: Generator { blocks, out },
            batch,
        };
        let steps = (rows / batch).max(1);
        let packs = batch / PAC;
        let masks = |n: usize, fast: &mut Fast| -> candle_core::Result<[Tensor; 2]> {
            Ok([
                Tensor::from_vec(fast.dropout(n * HIDDEN), (n, HIDDEN), &device)?,
                Tensor::from_vec(fast.dropout(n * HIDDEN), (n, HIDDEN), &device)?,
            ])
        };
        for epoch in 1..=epochs {
            monitor.checkpoint()?;
            let (mut generator_total, mut critic_total) = (0.0, 0.0);
            for _ in 0..steps {
                // The critic's step: real rows holding the levels the fake rows were asked for.
                let critic_loss = (|| -> candle_core::Result<Tensor> {
                    let asked = ask(
                        &model.conditions,
                        cond_width,
                        batch,
                        Asking::Training,
                        &mut fast,
                    );
                    let raw = model.generator.forward(&model.input(
                        batch,
                        asked.vectors.clone(),
                        &mut fast,
                    )?)?;
                    let gumbel =
                        Tensor::from_vec(fast.gumbels(batch * width), (batch, width), &device)?;
                    let fake = model.activate(&raw, &gumbel)?.detach();
                    let vectors =
                        Tensor::from_vec(asked.vectors.clone(), (batch, cond_width), &device)?;
                    let fake = model.pack(&fake, &vectors)?;
                    // Shuffled, so that a pack of real rows is not the fake pack's levels.
                    let mut order: Vec<usize> = (0..batch).collect();
                    for i in (1..batch).rev() {
                        order.swap(i, fast.below(i + 1));
                    }
                    let mut real = Vec::with_capacity(batch * (width + cond_width));
                    for &i in &order {
                        let row = match asked.picks.get(i) {
                            Some(&(k, slot)) if !model.conditions[k].rows[slot].is_empty() => {
                                let holding = &model.conditions[k].rows[slot];
                                holding[fast.below(holding.len())] as usize
                            }
                            _ => fast.below(rows),
                        };
                        real.extend_from_slice(&data[row * width..(row + 1) * width]);
                        real.extend_from_slice(
                            &asked.vectors[i * cond_width..(i + 1) * cond_width],
                        );
                    }
                    let real = Tensor::from_vec(real, (packs, packed), &device)?;
                    let both = Tensor::cat(&[&real, &fake], 0)?;
                    let (scores, _) = critic(&critic_layers, &both, &masks(2 * packs, &mut fast)?)?;
                    let wasserstein = (scores.narrow(0, packs, packs)?.mean_all()?
                        - scores.narrow(0, 0, packs)?.mean_all()?)?;
                    let alpha: Vec<f32> = (0..packs).map(|_| fast.open01() as f32).collect();
                    let alpha = Tensor::from_vec(alpha, (packs, 1), &device)?;
                    let between = (real.broadcast_mul(&alpha)?
                        + fake.broadcast_mul(&alpha.affine(-1.0, 1.0)?)?)?;
                    let between_masks = masks(packs, &mut fast)?;
                    let (_, slopes) = critic(&critic_layers, &between, &between_masks)?;
                    let gradient = input_gradient(&critic_layers, &slopes, &between_masks)?;
                    wasserstein + gradient_penalty(&gradient)?
                })()
                .map_err(fail)?;
                critic_optimizer.backward_step(&critic_loss).map_err(fail)?;
                critic_total += f64::from(critic_loss.to_scalar::<f32>().map_err(fail)?);

                // The generator's step, against a frozen copy of the critic.
                let generator_loss = (|| -> candle_core::Result<Tensor> {
                    let asked = ask(
                        &model.conditions,
                        cond_width,
                        batch,
                        Asking::Training,
                        &mut fast,
                    );
                    let vectors =
                        Tensor::from_vec(asked.vectors.clone(), (batch, cond_width), &device)?;
                    let raw = model.generator.forward(&model.input(
                        batch,
                        asked.vectors,
                        &mut fast,
                    )?)?;
                    let gumbel =
                        Tensor::from_vec(fast.gumbels(batch * width), (batch, width), &device)?;
                    let fake = model.pack(&model.activate(&raw, &gumbel)?, &vectors)?;
                    let frozen: Vec<Linear> = critic_layers
                        .iter()
                        .map(|l| Linear::new(l.weight().detach(), l.bias().map(Tensor::detach)))
                        .collect();
                    let (scores, _) = critic(&frozen, &fake, &masks(packs, &mut fast)?)?;
                    let mut loss = scores.mean_all()?.neg()?;
                    if !model.conditions.is_empty() {
                        loss = (loss + model.condition_loss(&raw, &asked.picks)?)?;
                    }
                    Ok(loss)
                })()
                .map_err(fail)?;
                generator_optimizer
                    .backward_step(&generator_loss)
                    .map_err(fail)?;
                generator_total += f64::from(generator_loss.to_scalar::<f32>().map_err(fail)?);
            }
            monitor.gan_epoch(
                epoch,
                epochs,
                generator_total / steps as f64,
                critic_total / steps as f64,
            );
        }
        for condition in &mut model.conditions {
            condition.rows = Vec::new();
        }
        Ok(model)
    }

    /// `rows` synthetic rows, one column per learned column, under condition vectors drawn by
    /// the levels' real frequencies, each row holding the level it asked for. (The
    /// reference's `sample_original_condvec` means to draw by real frequencies but reads the
    /// log-frequencies of training by sampling, and it leaves the asked-for column to the
    /// generator: both flatten the shares of an undertrained model.)
    pub fn sample(&self, rows: usize, seed: u64) -> Result<Vec<Values>, JobError> {
        self.sample_asking(rows, seed, Asking::Real)
    }

    pub(super) fn encoders(&self) -> &[Encoder] {
        &self.encoders
    }

    /// The condition and slot that stand for `level` of learned column `column`, when it has
    /// its own slot (a level beyond the one-hot's, sharing the last slot, has none).
    pub(super) fn condition_of(&self, column: usize, level: usize) -> Option<(usize, usize)> {
        let Encoder::Discrete {
            at, slots, rare, ..
        } = self.encoders.get(column)?
        else {
            return None;
        };
        let own = slots - usize::from(!rare.is_empty());
        let k = self.conditions.iter().position(|c| c.at == *at)?;
        (level < own).then_some((k, level))
    }

    /// `rows` synthetic rows that all hold the level of [`Ctgan::condition_of`]: the
    /// generator conditioned on it, as training taught it.
    pub(super) fn sample_given(
        &self,
        rows: usize,
        seed: u64,
        (condition, slot): (usize, usize),
    ) -> Result<Vec<Values>, JobError> {
        self.sample_asking(rows, seed, Asking::Only(condition, slot))
    }

    fn sample_asking(
        &self,
        rows: usize,
        seed: u64,
        asking: Asking,
    ) -> Result<Vec<Values>, JobError> {
        let mut rng = StdRng::seed_from_u64(seed);
        // Whole batches only: batch normalisation takes its statistics from the batch.
        let chunk = decoded_rows(&self.encoders).div_ceil(self.batch) * self.batch;
        let mut columns = Vec::with_capacity(self.encoders.len());
        let mut left = rows;
        loop {
            let n = left.min(chunk);
            let decoded = self.generate(n, asking, &mut rng)?;
            let part = self
                .encoders
                .iter()
                .map(|encoder| decode(encoder, &decoded, 0.0, true, &mut rng))
                .collect();
            append_columns(&mut columns, part);
            left -= n;
            if left == 0 {
                return Ok(columns);
            }
        }
    }

    /// The generator's raw outputs for `rows` rows, in whole batches.
    fn generate(
        &self,
        rows: usize,
        asking: Asking,
        rng: &mut StdRng,
    ) -> Result<Vec<Vec<f32>>, JobError> {
        let mut fast = Fast::new(rng);
        let mut decoded: Vec<Vec<f32>> = Vec::with_capacity(rows + self.batch);
        while decoded.len() < rows {
            let asked = ask(
                &self.conditions,
                self.cond_width,
                self.batch,
                asking,
                &mut fast,
            );
            let mut out = self
                .input(self.batch, asked.vectors, &mut fast)
                .and_then(|input| self.generator.forward(&input))
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(fail)?;
            // A row asked for a level holds it: the generator is trained to honour the
            // condition, and where it has not learned to yet, the condition still decides.
            for (row, &(k, slot)) in out.iter_mut().zip(&asked.picks) {
                let condition = &self.conditions[k];
                for (i, logit) in row[condition.at..condition.at + condition.slots]
                    .iter_mut()
                    .enumerate()
                {
                    *logit = if i == slot { 0.0 } else { f32::NEG_INFINITY };
                }
            }
            decoded.extend(out);
        }
        decoded.truncate(rows);
        Ok(decoded)
    }
}

/// A fitted CTGAN as a saved model keeps it: the columns' encodings, the conditions' level
/// shares and the generator (the critic only serves training).
#[derive(Serialize, Deserialize)]
struct CtganFile {
    encoders: Vec<Encoder>,
    conditions: Vec<Condition>,
    cond_width: usize,
    blocks: Vec<BlockFile>,
    out: LayerFile,
    /// Rows per generator pass: batch normalisation takes its statistics from the batch.
    batch: usize,
}

#[derive(Serialize, Deserialize)]
struct BlockFile {
    linear: LayerFile,
    gamma: Floats,
    beta: Floats,
}

impl Serialize for Ctgan {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let file = (|| -> candle_core::Result<CtganFile> {
            let blocks = self
                .generator
                .blocks
                .iter()
                .map(|b| {
                    Ok(BlockFile {
                        linear: LayerFile::of(&b.linear)?,
                        gamma: Floats::of(&b.gamma)?,
                        beta: Floats::of(&b.beta)?,
                    })
                })
                .collect::<candle_core::Result<_>>()?;
            Ok(CtganFile {
                encoders: self.encoders.clone(),
                conditions: self.conditions.clone(),
                cond_width: self.cond_width,
                blocks,
                out: LayerFile::of(&self.generator.out)?,
                batch: self.batch,
            })
        })()
        .map_err(serde::ser::Error::custom)?;
        file.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Ctgan {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let file = CtganFile::deserialize(deserializer)?;
        if !file.fits() {
            return Err(serde::de::Error::custom(
                "the generator's layers do not fit the model's columns",
            ));
        }
        let generator = (|| -> candle_core::Result<Generator> {
            let blocks = file
                .blocks
                .iter()
                .map(|b| {
                    Ok(Block {
                        linear: b.linear.linear()?,
                        gamma: b.gamma.vector(HIDDEN)?.reshape((1, HIDDEN))?,
                        beta: b.beta.vector(HIDDEN)?.reshape((1, HIDDEN))?,
                    })
                })
                .collect::<candle_core::Result<_>>()?;
            Ok(Generator {
                blocks,
                out: file.out.linear()?,
            })
        })()
        .map_err(serde::de::Error::custom)?;
        Ok(Ctgan {
            encoders: file.encoders,
            conditions: file.conditions,
            cond_width: file.cond_width,
            generator,
            batch: file.batch,
        })
    }
}

impl CtganFile {
    /// Whether the layers chain and the conditions are the discrete columns' one-hots, as
    /// [`Ctgan::fit`] builds them.
    fn fits(&self) -> bool {
        let width = laid_out(&self.encoders);
        let mut cond_at = 0;
        let discrete = self.encoders.iter().filter_map(|e| match e {
            Encoder::Discrete { at, slots, .. } => Some((*at, *slots)),
            Encoder::Continuous { .. } => None,
        });
        let conditions_fit = discrete.clone().count() == self.conditions.len()
            && discrete.zip(&self.conditions).all(|((at, slots), c)| {
                let fits = c.at == at && c.slots == slots && c.cond_at == cond_at;
                cond_at += slots;
                fits && c.real.len() == slots && c.log.len() == slots
            });
        let mut input = LATENT + self.cond_width;
        let blocks_fit = self.blocks.iter().all(|b| {
            let fits = b.linear.inputs == input && b.linear.outputs == HIDDEN;
            input += HIDDEN;
            fits
        });
        conditions_fit
            && cond_at == self.cond_width
            && blocks_fit
            && self.out.inputs == input
            && Some(self.out.outputs) == width
            && (1..=BATCH).contains(&self.batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthesis::{copula::plain_specs, stats::standard_normal, Quiet};
    use polars::prelude::DataType;
    use std::sync::Mutex;

    /// A small random critic in f64, its weights variables, and dropout masks for `n` rows.
    fn small_critic(
        input: usize,
        n: usize,
        seed: u64,
    ) -> (Vec<Linear>, Vec<Var>, [Tensor; 2], Tensor) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut fast = Fast::new(&mut rng);
        let hidden = 6;
        let mut vars = Vec::new();
        let mut layers = Vec::new();
        for (i, o) in [(input, hidden), (hidden, hidden), (hidden, 1)] {
            let w: Vec<f64> = (0..i * o).map(|_| standard_normal(&mut rng)).collect();
            let b: Vec<f64> = (0..o).map(|_| standard_normal(&mut rng) * 0.1).collect();
            let w = Var::from_tensor(&Tensor::from_vec(w, (o, i), &Device::Cpu).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::from_vec(b, o, &Device::Cpu).unwrap()).unwrap();
            layers.push(Linear::new(
                w.as_tensor().clone(),
                Some(b.as_tensor().clone()),
            ));
            vars.extend([w, b]);
        }
        let mask = |fast: &mut Fast| {
            let m: Vec<f64> = fast
                .dropout(n * hidden)
                .into_iter()
                .map(f64::from)
                .collect();
            Tensor::from_vec(m, (n, hidden), &Device::Cpu).unwrap()
        };
        let masks = [mask(&mut fast), mask(&mut fast)];
        let x: Vec<f64> = (0..n * input).map(|_| standard_normal(&mut rng)).collect();
        let x = Tensor::from_vec(x, (n, input), &Device::Cpu).unwrap();
        (layers, vars, masks, x)
    }

    #[test]
    fn the_closed_form_input_gradient_matches_finite_differences() {
        let (input, n) = (7, 4);
        let (layers, _, masks, x) = small_critic(input, n, 3);
        let (_, slopes) = critic(&layers, &x, &masks).unwrap();
        let gradient = input_gradient(&layers, &slopes, &masks)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let h = 1e-6;
        let base = x.to_vec2::<f64>().unwrap();
        let score = |rows: &[Vec<f64>]| -> Vec<f64> {
            let flat: Vec<f64> = rows.concat();
            let x = Tensor::from_vec(flat, (n, input), &Device::Cpu).unwrap();
            let (y, _) = critic(&layers, &x, &masks).unwrap();
            y.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        };
        let mut nonzero = 0;
        for row in 0..n {
            for j in 0..input {
                let (mut up, mut down) = (base.clone(), base.clone());
                up[row][j] += h;
                down[row][j] -= h;
                let numeric = (score(&up)[row] - score(&down)[row]) / (2.0 * h);
                let closed = gradient[row][j];
                assert!(
                    (numeric - closed).abs() <= 1e-6 * (1.0 + closed.abs()),
                    "row {row}, input {j}: closed form {closed}, finite differences {numeric}"
                );
                nonzero += usize::from(closed.abs() > 1e-9);
            }
        }
        assert!(nonzero > n * input / 2, "{nonzero}");
    }

    /// The penalty's gradient with respect to the weights, as candle computes it from the
    /// closed form, matches finite differences of the penalty.
    #[test]
    fn the_gradient_penalty_differentiates_with_respect_to_the_weights() {
        let (input, n) = (5, 3);
        let (layers, vars, masks, x) = small_critic(input, n, 8);
        let penalty = |layers: &[Linear]| {
            let (_, slopes) = critic(layers, &x, &masks).unwrap();
            gradient_penalty(&input_gradient(layers, &slopes, &masks).unwrap()).unwrap()
        };
        let grads = penalty(&layers).backward().unwrap();
        let h = 1e-6;
        // Weights of each layer (vars 0, 2, 4), a few entries each.
        for v in [0, 2, 4] {
            let var = &vars[v];
            let analytic = grads
                .get(var.as_tensor())
                .expect("a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let original = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for entry in [0, original.len() / 2, original.len() - 1] {
                let at = |delta: f64| {
                    let mut w = original.clone();
                    w[entry] += delta;
                    let w = Tensor::from_vec(w, var.as_tensor().shape(), &Device::Cpu).unwrap();
                    let mut changed: Vec<Linear> = layers.clone();
                    changed[v / 2] = Linear::new(w, layers[v / 2].bias().cloned());
                    penalty(&changed).to_scalar::<f64>().unwrap()
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (numeric - analytic[entry]).abs() <= 1e-5 * (1.0 + numeric.abs()),
                    "layer {}, weight {entry}: candle {}, finite differences {numeric}",
                    v / 2,
                    analytic[entry]
                );
            }
        }
    }

    /// A label with shares 0.6/0.3/0.1 and a normal number whose mean follows the label.
    fn columns(n: usize) -> Vec<Column> {
        let mut rng = StdRng::seed_from_u64(21);
        let mut x = Vec::new();
        let mut c = Vec::new();
        for i in 0..n {
            let (label, mean) = match i % 10 {
                0..=5 => ("a", 40.0),
                6..=8 => ("b", 60.0),
                _ => ("c", 80.0),
            };
            x.push(Some(mean + 5.0 * standard_normal(&mut rng)));
            c.push(Some(label.to_owned()));
        }
        vec![
            Column::numbers("x", DataType::Float64, x),
            Column::labels("c", c),
        ]
    }

    /// A network whose size grows with the square of the encoded width is refused before it
    /// is built: 300 rows of 200 columns of 100 short labels (a few hundred KB of CSV) made a
    /// CTGAN of about 10^9 weights (gigabytes with its gradients and moments), and no cap
    /// counted it.
    #[test]
    fn a_network_past_the_memory_cap_is_refused_before_it_is_built() {
        struct Capped(u64);
        impl Monitor for Capped {
            fn stage(&self, _: f32, _: &str) {}
            fn epoch(&self, _: usize, _: usize, _: f64) {}
            fn checkpoint(&self) -> Result<(), shared::Cancelled> {
                Ok(())
            }
            fn memory_cap(&self) -> u64 {
                self.0
            }
        }
        let wide: Vec<Column> = (0..200)
            .map(|c| {
                let labels = (0..300).map(|r| Some(format!("{}", (r * 7 + c) % 100)));
                Column::labels(&format!("c{c}"), labels.collect())
            })
            .collect();
        let started = std::time::Instant::now();
        let gib = Capped(1 << 30);
        let Err(JobError::Permanent(why)) = Ctgan::fit(&plain_specs(&wide), 1, 1, &gib) else {
            panic!("fitted");
        };
        assert!(why.contains("CONVEYOR_MAX_IN_MEMORY_BYTES"), "{why}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        // TVAE grows with the width alone: refused under a smaller cap.
        let Err(JobError::Permanent(why)) =
            super::super::tvae::Tvae::fit(&plain_specs(&wide), 1, 1, &Capped(32 << 20))
        else {
            panic!("fitted");
        };
        assert!(why.contains("a TVAE of this table"), "{why}");
        // The small table still fits under the cap.
        let data = columns(500);
        assert!(Ctgan::fit(&plain_specs(&data), 1, 1, &gib).is_ok());
    }

    struct Losses(Mutex<Vec<(f64, f64)>>);

    impl Monitor for Losses {
        fn stage(&self, _: f32, _: &str) {}
        fn epoch(&self, _: usize, _: usize, _: f64) {}
        fn gan_epoch(&self, _: usize, _: usize, generator: f64, critic: f64) {
            self.0.lock().unwrap().push((generator, critic));
        }
        fn checkpoint(&self) -> Result<(), shared::Cancelled> {
            Ok(())
        }
    }

    #[test]
    fn a_small_fit_keeps_the_category_shares_and_the_numbers_shape() {
        let data = columns(1000);
        let losses = Losses(Mutex::new(Vec::new()));
        // A GAN learns slowly: 500 steps of batches of 200 (CTGAN's learning rates).
        let epochs = 100;
        let model = Ctgan::fit(&plain_specs(&data), epochs, 4, &losses).unwrap();
        let losses = losses.0.into_inner().unwrap();
        assert_eq!(losses.len(), epochs);
        assert!(
            losses.iter().all(|(g, c)| g.is_finite() && c.is_finite()),
            "{losses:?}"
        );

        let sample = model.sample(2000, 9).unwrap();
        let Values::Labels(c) = &sample[1] else {
            panic!()
        };
        let share = |label: &str| {
            c.iter().filter(|v| v.as_deref() == Some(label)).count() as f64 / c.len() as f64
        };
        let shares = [share("a"), share("b"), share("c")];
        // Conditions are drawn by the real shares and each row keeps its own: within 0.04 (about
        // 3.5 standard errors of 2,000 draws).
        for (got, want) in shares.iter().zip([0.6, 0.3, 0.1]) {
            assert!((got - want).abs() < 0.04, "shares {shares:?}");
        }
        let Values::Numbers(x) = &sample[0] else {
            panic!()
        };
        let x: Vec<f64> = x.iter().flatten().copied().collect();
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        let std = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
        // Real: mean 50, standard deviation about 14; roughly there after 500 steps (a mean of
        // 56 to 59 as the random stream or the modes' count changed, a standard deviation
        // near 16): this guards against a broken fit, not for a good one.
        assert!((mean - 50.0).abs() < 12.0, "mean {mean}");
        assert!((10.0..20.0).contains(&std), "std {std}");
        // Same seeds, same rows.
        assert_eq!(
            model.sample(50, 6).unwrap()[0],
            model.sample(50, 6).unwrap()[0]
        );
        let again = Ctgan::fit(&plain_specs(&data), 1, 4, &Quiet).unwrap();
        let once = Ctgan::fit(&plain_specs(&data), 1, 4, &Quiet).unwrap();
        assert_eq!(again.sample(20, 1).unwrap(), once.sample(20, 1).unwrap());
    }

    #[test]
    fn stops_between_epochs_when_cancelled() {
        /// Lets `allowed` epochs start, then asks to stop.
        struct StopAfter {
            allowed: usize,
            started: Mutex<usize>,
            done: Mutex<usize>,
        }
        impl Monitor for StopAfter {
            fn stage(&self, _: f32, _: &str) {}
            fn epoch(&self, _: usize, _: usize, _: f64) {}
            fn gan_epoch(&self, _: usize, _: usize, _: f64, _: f64) {
                *self.done.lock().unwrap() += 1;
            }
            fn checkpoint(&self) -> Result<(), shared::Cancelled> {
                let mut started = self.started.lock().unwrap();
                if *started == self.allowed {
                    return Err(shared::Cancelled);
                }
                *started += 1;
                Ok(())
            }
        }
        let data = columns(200);
        let stop = StopAfter {
            allowed: 2,
            started: Mutex::new(0),
            done: Mutex::new(0),
        };
        assert!(matches!(
            Ctgan::fit(&plain_specs(&data), 50, 1, &stop),
            Err(JobError::Cancelled(_))
        ));
        assert_eq!(*stop.done.lock().unwrap(), 2);
    }

    #[test]
    fn numbers_only_tables_train_without_conditions() {
        let data = vec![columns(200).swap_remove(0)];
        let model = Ctgan::fit(&plain_specs(&data), 2, 1, &Quiet).unwrap();
        assert_eq!(model.cond_width, 0);
        let sample = model.sample(30, 2).unwrap();
        let Values::Numbers(x) = &sample[0] else {
            panic!()
        };
        assert_eq!(x.len(), 30);
        assert!(x.iter().flatten().all(|v| v.is_finite()));
    }
}
