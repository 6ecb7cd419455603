//! BERT's encoder for sentence embeddings, written for throughput on a few CPU cores.
//!
//! The texts of a call are packed end to end, with no padding, into groups of a few hundred
//! tokens, and each core runs whole groups through the whole model on its own: the linear
//! maps are single-threaded matrix products over the group's real tokens, attention runs per
//! text and head over that text's own tokens, and every activation of a group stays in one
//! set of buffers small enough for the core's caches. No thread waits on another until the
//! last group is done, no activation is allocated per layer, and the element-wise steps
//! (bias, residual, layer norm, GELU, softmax) run in place, vectorised. Same arithmetic as
//! candle-transformers' `BertModel` with an attention mask, in f32 (that crate is not a
//! dependency: only the weights and `config.json` are read, and it costs a minute of every
//! cold build).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::Deserialize;

/// The fields of a Hugging Face BERT `config.json` the encoder reads; the others are ignored.
#[derive(Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: HiddenAct,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
}

/// The activations the encoder computes: exact GELU, or its tanh approximation under any of
/// the names Hugging Face gives it. Another (`relu`, ...) is refused when the model loads.
#[derive(Debug, Deserialize, PartialEq)]
pub enum HiddenAct {
    #[serde(rename = "gelu")]
    Gelu,
    #[serde(
        alias = "gelu_new",
        alias = "gelu_pytorch_tanh",
        rename = "gelu_approximate"
    )]
    GeluApproximate,
}

/// Tokens per group: enough rows to keep the matrix products efficient, few enough that a
/// group's activations (about 14 KB per token) stay in the caches. Measured here: 256 is a
/// little faster than 512 or 1024, and clearly faster than 128 or 2048.
const GROUP_TOKENS: usize = 256;

pub struct Bert {
    hidden: usize,
    heads: usize,
    /// Word and position embeddings, (entries, hidden) row-major.
    word: Vec<f32>,
    position: Vec<f32>,
    /// Every token is of type 0: its embedding row, added to each token.
    token_type: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    gelu_approximate: bool,
}

struct Layer {
    /// Query, key and value in one product: hidden → 3 × hidden.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

/// A linear map, its weight stored transposed: (inputs, outputs) row-major.
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

/// A group's activations, reused from group to group by the thread that runs them.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    intermediate: Vec<f32>,
    scores: Vec<f32>,
}

fn values(tensor: Tensor) -> Result<Vec<f32>> {
    tensor.flatten_all()?.to_vec1()
}

impl Dense {
    fn load(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Self> {
        Self::new(
            vb.get((outputs, inputs), "weight")?,
            vb.get(outputs, "bias")?,
        )
    }

    /// From candle's layout: weight (outputs, inputs), bias (outputs).
    fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        let inputs = weight.dim(1)?;
        Ok(Self {
            weight: values(weight.t()?.contiguous()?)?,
            bias: values(bias)?,
            inputs,
        })
    }

    /// `out = input · W + bias`, or `out += input · W + bias` when `accumulate` (the residual
    /// connections), for `input` of (rows, inputs) and `out` of (rows, outputs).
    fn apply(&self, input: &[f32], out: &mut [f32], accumulate: bool) {
        let outputs = self.bias.len();
        let rows = input.len() / self.inputs;
        // The product below writes exactly this much of `out`.
        assert_eq!(out.len(), rows * outputs, "output buffer size");
        for row in out.chunks_exact_mut(outputs) {
            if accumulate {
                row.iter_mut().zip(&self.bias).for_each(|(o, b)| *o += b);
            } else {
                row.copy_from_slice(&self.bias);
            }
        }
        // SAFETY: the sizes and row-major strides describe exactly `input`, `self.weight`
        // and `out`, which do not overlap.
        unsafe {
            gemm::gemm(
                rows,
                outputs,
                self.inputs,
                out.as_mut_ptr(),
                1,
                outputs as isize,
                true,
                input.as_ptr(),
                1,
                self.inputs as isize,
                self.weight.as_ptr(),
                1,
                outputs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

impl Norm {
    fn load(vb: VarBuilder, hidden: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gamma: values(vb.get(hidden, "weight")?)?,
            beta: values(vb.get(hidden, "bias")?)?,
            eps: eps as f32,
        })
    }

    /// Normalises each row of `rows` in place.
    fn apply(&self, rows: &mut [f32]) {
        layer_norm(rows, &self.gamma, &self.beta, self.eps);
    }
}

impl Bert {
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let hidden = config.hidden_size;
        let eps = config.layer_norm_eps;
        let embeddings = vb.pp("embeddings");
        let table = |name: &str, entries: usize| {
            values(embeddings.pp(name).get((entries, hidden), "weight")?)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attention = vb.pp("attention");
                let part = |name: &str| -> Result<(Tensor, Tensor)> {
                    let vb = attention.pp("self").pp(name);
                    Ok((vb.get((hidden, hidden), "weight")?, vb.get(hidden, "bias")?))
                };
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                Ok(Layer {
                    qkv: Dense::new(
                        Tensor::cat(&[q.0, k.0, v.0], 0)?,
                        Tensor::cat(&[q.1, k.1, v.1], 0)?,
                    )?,
                    attention_out: Dense::load(attention.pp("output.dense"), hidden, hidden)?,
                    attention_norm: Norm::load(attention.pp("output.LayerNorm"), hidden, eps)?,
                    intermediate: Dense::load(
                        vb.pp("intermediate.dense"),
                        hidden,
                        config.intermediate_size,
                    )?,
                    output: Dense::load(vb.pp("output.dense"), config.intermediate_size, hidden)?,
                    output_norm: Norm::load(vb.pp("output.LayerNorm"), hidden, eps)?,
                })
            })
            .collect::<Result<_>>()?;
        let mut token_type = table("token_type_embeddings", config.type_vocab_size)?;
        token_type.truncate(hidden);
        Ok(Self {
            hidden,
            heads: config.num_attention_heads,
            word: table("word_embeddings", config.vocab_size)?,
            position: table("position_embeddings", config.max_position_embeddings)?,
            token_type,
            embedding_norm: Norm::load(embeddings.pp("LayerNorm"), hidden, eps)?,
            layers,
            gelu_approximate: config.hidden_act == HiddenAct::GeluApproximate,
        })
    }

    /// The mean of each sequence's final token states (sentence-transformers' mean pooling:
    /// every token here is real, so the attention mask is all ones), in order.
    pub fn mean_pooled(&self, sequences: &[&[u32]]) -> Vec<Vec<f32>> {
        let total: usize = sequences.iter().map(|s| s.len()).sum();
        // Small calls still use every core.
        let group_tokens = total
            .div_ceil(rayon::current_num_threads())
            .clamp(1, GROUP_TOKENS);
        let mut groups = Vec::new();
        let mut rest = sequences;
        while !rest.is_empty() {
            let mut size = 1;
            let mut tokens = rest[0].len();
            while size < rest.len() && tokens + rest[size].len() <= group_tokens {
                tokens += rest[size].len();
                size += 1;
            }
            let (group, tail) = rest.split_at(size);
            groups.push(group);
            rest = tail;
        }
        let pooled: Vec<Vec<Vec<f32>>> = groups
            .into_par_iter()
            .map_init(Scratch::default, |scratch, group| {
                self.encode(group, scratch)
            })
            .collect();
        pooled.into_iter().flatten().collect()
    }

    /// Runs one group of sequences through the model on this thread.
    fn encode(&self, sequences: &[&[u32]], scratch: &mut Scratch) -> Vec<Vec<f32>> {
        let hidden = self.hidden;
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        let tokens: usize = lengths.iter().sum();
        let Scratch {
            x,
            qkv,
            context,
            intermediate,
            scores,
        } = scratch;
        x.resize(tokens * hidden, 0.0);
        let rows = sequences
            .iter()
            .flat_map(|s| s.iter().enumerate())
            .zip(x.chunks_exact_mut(hidden));
        for ((position, &id), row) in rows {
            let word = &self.word[id as usize * hidden..][..hidden];
            let place = &self.position[position * hidden..][..hidden];
            for (i, value) in row.iter_mut().enumerate() {
                *value = word[i] + place[i] + self.token_type[i];
            }
        }
        self.embedding_norm.apply(x);
        for layer in &self.layers {
            qkv.resize(tokens * 3 * hidden, 0.0);
            layer.qkv.apply(x, qkv, false);
            context.resize(tokens * hidden, 0.0);
            attention(qkv, &lengths, self.heads, context, scores);
            layer.attention_out.apply(context, x, true);
            layer.attention_norm.apply(x);
            intermediate.resize(tokens * layer.intermediate.bias.len(), 0.0);
            layer.intermediate.apply(x, intermediate, false);
            if self.gelu_approximate {
                gelu_tanh(intermediate);
            } else {
                gelu_erf(intermediate);
            }
            layer.output.apply(intermediate, x, true);
            layer.output_norm.apply(x);
        }
        let mut states = x.chunks_exact(hidden);
        lengths
            .iter()
            .map(|&length| {
                let mut sum = vec![0f32; hidden];
                for row in states.by_ref().take(length) {
                    sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                let count = (length as f32).max(1e-9);
                sum.iter_mut().for_each(|s| *s /= count);
                sum
            })
            .collect()
    }
}

/// Scaled dot-product attention of each sequence with itself, per head, on this thread.
/// `qkv` is (tokens, 3 × hidden): queries, keys, values side by side; `out` is (tokens, hidden).
fn attention(qkv: &[f32], lengths: &[usize], heads: usize, out: &mut [f32], scores: &mut Vec<f32>) {
    let tokens: usize = lengths.iter().sum();
    let width = qkv.len() / tokens.max(1);
    let hidden = width / 3;
    // The products below stay inside these sizes.
    assert_eq!(
        (qkv.len(), out.len()),
        (tokens * width, tokens * hidden),
        "attention buffer sizes"
    );
    let dim = hidden / heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let mut start = 0;
    for &n in lengths {
        scores.resize(n * n, 0.0);
        for head in 0..heads {
            let base = start * width + head * dim;
            let (q, k, v) = (
                &qkv[base..],
                &qkv[base + hidden..],
                &qkv[base + 2 * hidden..],
            );
            let dst = &mut out[start * hidden + head * dim..];
            // SAFETY: with these sizes and strides every access stays inside `qkv`, `scores`
            // and this sequence's rows × this head's columns of `out`.
            unsafe {
                // scores = scale · Q Kᵀ
                gemm::gemm(
                    n,
                    n,
                    dim,
                    scores.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    q.as_ptr(),
                    1,
                    width as isize,
                    k.as_ptr(),
                    width as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            softmax(scores, n);
            unsafe {
                // out[sequence rows, head columns] = softmax(scores) V
                gemm::gemm(
                    n,
                    dim,
                    n,
                    dst.as_mut_ptr(),
                    1,
                    hidden as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    n as isize,
                    v.as_ptr(),
                    1,
                    width as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        start += n;
    }
}

/// Defines a function over slices whose loops are compiled twice: for AVX2 + FMA, used where
/// the CPU has them, and for the baseline the crate is built for (SSE2: four lanes). Each
/// takes a whole matrix, so the CPU check runs once per matrix, not once per row.
macro_rules! vectorised {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

vectorised! {
    /// GELU with the exact (erf) form.
    fn gelu_erf(values: &mut [f32]) {
        for x in values {
            *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

vectorised! {
    /// GELU with the tanh approximation.
    fn gelu_tanh(values: &mut [f32]) {
        for x in values {
            let z = 0.797_884_6 * (*x + 0.044_715 * *x * *x * *x);
            // tanh z = 1 − 2 / (e^{2z} + 1)
            let tanh = 1.0 - 2.0 / (exp(2.0 * z) + 1.0);
            *x = 0.5 * *x * (1.0 + tanh);
        }
    }
}

vectorised! {
    /// Softmax of each row (`width` values) of `rows`, in place.
    fn softmax(rows: &mut [f32], width: usize) {
        for row in rows.chunks_exact_mut(width) {
            let max = lanes_max(row);
            for s in row.iter_mut() {
                *s = exp(*s - max);
            }
            let inverse = 1.0 / lanes_sum(row, |s| s);
            row.iter_mut().for_each(|s| *s *= inverse);
        }
    }
}

vectorised! {
    /// Layer normalisation of each row (as long as `gamma`) of `rows`, in place.
    fn layer_norm(rows: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        for row in rows.chunks_exact_mut(gamma.len()) {
            let count = row.len() as f32;
            let mean = lanes_sum(row, |x| x) / count;
            row.iter_mut().for_each(|x| *x -= mean);
            let variance = lanes_sum(row, |x| x * x) / count;
            let scale = 1.0 / (variance + eps).sqrt();
            for ((x, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *x = *x * scale * g + b;
            }
        }
    }
}

/// Σ term(x) over a slice, in eight interleaved running sums (which the compiler keeps in one
/// vector register: a single running sum would force it to go one element at a time).
#[inline(always)]
fn lanes_sum(values: &[f32], term: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| term(x)).sum();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += term(x);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The largest value of a slice, in eight interleaved lanes as [`lanes_sum`].
#[inline(always)]
fn lanes_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    lanes.into_iter().fold(tail, f32::max)
}

/// eˣ within 2 ulp for x in [−87, 88] (below: the smallest normal float instead of 0, which
/// changes no softmax), branch-free so that loops over it vectorise: x = n·ln 2 + r with |r| ≤
/// ln 2 / 2, eʳ by Cephes' degree-6 polynomial, 2ⁿ built in the exponent bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let n = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    er * f32::from_bits(((n + 127) as u32) << 23)
}

/// Abramowitz & Stegun 7.1.26: absolute error below 1.5e-7, well under f32 rounding of the
/// activations it feeds.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp(-x * x)).copysign(x)
}

#[cfg(test)]
mod tests {
    #[test]
    fn erf_matches_its_table_values() {
        // erf(x) from Abramowitz & Stegun's Table 7.1.
        for (x, erf) in [
            (0.0, 0.0),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
        ] {
            assert!((super::erf(x) - erf).abs() < 3e-7, "erf({x})");
            assert!((super::erf(-x) + erf).abs() < 3e-7, "erf(-{x})");
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_standard_library() {
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (ours, std) = (super::exp(x), x.exp());
            let ulp = (ours.to_bits() as i64 - std.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {ours}, not {std}");
            x += 0.0137;
        }
    }

    #[test]
    fn softmax_gelu_and_layer_norm_match_their_definitions() {
        // 19 values: the vectorised loops' eight lanes and a tail.
        let values: Vec<f32> = (0..19).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut row = values.clone();
        super::softmax(&mut row, 19);
        let max = values.iter().copied().fold(f32::MIN, f32::max);
        let sum: f32 = values.iter().map(|v| (v - max).exp()).sum();
        for (got, v) in row.iter().zip(&values) {
            assert!((got - (v - max).exp() / sum).abs() < 1e-6);
        }

        let (gamma, beta): (Vec<f32>, Vec<f32>) = (0..19)
            .map(|i| (1.0 + i as f32 / 10.0, i as f32 / 7.0))
            .unzip();
        let mut row = values.clone();
        super::gelu_tanh(&mut row);
        for (got, x) in row.iter().zip(&values) {
            let tanh = (0.797_884_6 * (x + 0.044_715 * x.powi(3))).tanh();
            assert!((got - 0.5 * x * (1.0 + tanh)).abs() < 1e-6);
        }

        let mut row = values.clone();
        super::layer_norm(&mut row, &gamma, &beta, 1e-12);
        let mean = values.iter().sum::<f32>() / 19.0;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 19.0;
        for (i, (got, v)) in row.iter().zip(&values).enumerate() {
            let want = (v - mean) / variance.sqrt() * gamma[i] + beta[i];
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
}
