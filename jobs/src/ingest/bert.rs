//! BERT's encoder for sentence embeddings, on packed sequences: the token rows of every text
//! in a batch lie end to end with no padding, so each position-wise step (the linear maps,
//! layer norms, GELU) is one large matrix product over real tokens only, and attention runs
//! per text and head in parallel, over that text's own tokens. Same arithmetic as
//! candle-transformers' `BertModel` with an attention mask, without the padding work and
//! without thousands of small sequential matrix products.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

pub struct Bert {
    word: Embedding,
    position: Embedding,
    /// Every token is of type 0: its embedding row, added to each token.
    token_type: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    gelu_approximate: bool,
}

struct Layer {
    /// Query, key and value in one product: (3 × hidden, hidden).
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl Bert {
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let hidden = config.hidden_size;
        let norm = |vb: VarBuilder| candle_nn::layer_norm(hidden, config.layer_norm_eps, vb);
        let embeddings = vb.pp("embeddings");
        let token_types = candle_nn::embedding(
            config.type_vocab_size,
            hidden,
            embeddings.pp("token_type_embeddings"),
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attention = vb.pp("attention");
                let part = |name: &str| -> Result<(Tensor, Tensor)> {
                    let vb = attention.pp("self").pp(name);
                    Ok((vb.get((hidden, hidden), "weight")?, vb.get(hidden, "bias")?))
                };
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                let qkv = Linear::new(
                    Tensor::cat(&[q.0, k.0, v.0], 0)?,
                    Some(Tensor::cat(&[q.1, k.1, v.1], 0)?),
                );
                Ok(Layer {
                    qkv,
                    attention_out: candle_nn::linear(hidden, hidden, attention.pp("output.dense"))?,
                    attention_norm: norm(attention.pp("output.LayerNorm"))?,
                    intermediate: candle_nn::linear(
                        hidden,
                        config.intermediate_size,
                        vb.pp("intermediate.dense"),
                    )?,
                    output: candle_nn::linear(
                        config.intermediate_size,
                        hidden,
                        vb.pp("output.dense"),
                    )?,
                    output_norm: norm(vb.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            word: candle_nn::embedding(
                config.vocab_size,
                hidden,
                embeddings.pp("word_embeddings"),
            )?,
            position: candle_nn::embedding(
                config.max_position_embeddings,
                hidden,
                embeddings.pp("position_embeddings"),
            )?,
            token_type: token_types.embeddings().get(0)?,
            embedding_norm: norm(embeddings.pp("LayerNorm"))?,
            layers,
            heads: config.num_attention_heads,
            gelu_approximate: matches!(config.hidden_act, HiddenAct::GeluApproximate),
        })
    }

    /// The mean of each sequence's final token states (sentence-transformers' mean pooling:
    /// every token here is real, so the attention mask is all ones).
    pub fn mean_pooled(&self, sequences: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        let ids: Vec<u32> = sequences.iter().flat_map(|s| s.iter().copied()).collect();
        let positions: Vec<u32> = lengths.iter().flat_map(|&l| 0..l as u32).collect();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &Device::Cpu)?;
        let positions = Tensor::from_vec(positions, total, &Device::Cpu)?;
        let embedded = (self.word.forward(&ids)? + self.position.forward(&positions)?)?
            .broadcast_add(&self.token_type)?;
        let mut x = self.embedding_norm.forward(&embedded)?;
        for layer in &self.layers {
            let context = attention(&layer.qkv.forward(&x)?, &lengths, self.heads)?;
            let attended = (layer.attention_out.forward(&context)? + &x)?;
            x = layer.attention_norm.forward(&attended)?;
            let intermediate = layer.intermediate.forward(&x)?;
            let activated = if self.gelu_approximate {
                intermediate.gelu()?
            } else {
                gelu_erf(&intermediate)?
            };
            x = layer
                .output_norm
                .forward(&(layer.output.forward(&activated)? + &x)?)?;
        }
        let states = x.to_vec2::<f32>()?;
        let mut pooled = Vec::with_capacity(lengths.len());
        let mut rows = states.iter();
        for &length in &lengths {
            let mut sum = vec![0f32; states.first().map_or(0, Vec::len)];
            for row in rows.by_ref().take(length) {
                sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            let count = (length as f32).max(1e-9);
            pooled.push(sum.into_iter().map(|s| s / count).collect());
        }
        Ok(pooled)
    }
}

/// GELU with the exact (erf) form, in f32 and in parallel: candle's computes erf in f64, one
/// value at a time, which made it a fifth of the model's time.
fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    let mut values = xs.flatten_all()?.to_vec1::<f32>()?;
    values.par_chunks_mut(4096).for_each(|chunk| {
        for x in chunk {
            *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
        }
    });
    Tensor::from_vec(values, xs.shape(), &Device::Cpu)
}

/// Abramowitz & Stegun 7.1.26: absolute error below 1.5e-7, well under f32 rounding of the
/// activations it feeds.
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * (-x * x).exp()).copysign(x)
}

/// Where threads write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);

// SAFETY: each (sequence, head) task writes only its own rows × columns of the buffer.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Through a method, so closures capture the `Shared`, not its bare pointer.
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer (see `attention`).
        unsafe { self.0.add(offset) }
    }
}

/// Scaled dot-product attention of each sequence with itself, per head. `qkv` is
/// (tokens, 3 × hidden): queries, keys, values side by side. Returns (tokens, hidden).
fn attention(qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<Tensor> {
    let (total, width) = qkv.dims2()?;
    let hidden = width / 3;
    let dim = hidden / heads;
    let qkv = qkv.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; total * hidden];
    let starts: Vec<usize> = lengths
        .iter()
        .scan(0, |at, &l| {
            let start = *at;
            *at += l;
            Some(start)
        })
        .collect();
    let scale = 1.0 / (dim as f32).sqrt();
    let dst = Shared(out.as_mut_ptr());
    (0..lengths.len() * heads).into_par_iter().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, task| {
            let (sequence, head) = (task / heads, task % heads);
            let (n, start) = (lengths[sequence], starts[sequence]);
            scores.clear();
            scores.resize(n * n, 0.0);
            let base = start * width + head * dim;
            let (q, k, v) = (
                &qkv[base..],
                &qkv[base + hidden..],
                &qkv[base + 2 * hidden..],
            );
            // SAFETY: the strides keep every access inside `qkv`, `scores` and this task's
            // own (rows of the sequence) × (columns of the head) block of `out`.
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
            for row in scores.chunks_mut(n) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                row.iter_mut().for_each(|s| *s /= sum);
            }
            unsafe {
                // out[sequence rows, head columns] = softmax(scores) V
                gemm::gemm(
                    n,
                    dim,
                    n,
                    dst.at(start * hidden + head * dim),
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
        },
    );
    Tensor::from_vec(out, (total, hidden), &Device::Cpu)
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
}
