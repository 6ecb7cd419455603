//! Batch normalisation (batch statistics) then ReLU, as one operation with its backward pass
//! written out. As candle tensor operations it was ten operations forward and more than twice
//! as many backward, each a pass over the batch into a new tensor; here it is three passes
//! forward and four backward.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

const EPS: f64 = 1e-5;

/// relu(γ · (h − mean) / √(variance + ε) + β), the statistics over `h`'s rows (n × c); γ and β
/// are 1 × c.
pub(super) fn batch_norm_relu(h: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    h.apply_op3(gamma, beta, BatchNormRelu)
}

struct BatchNormRelu;

/// A contiguous f32 storage's elements (what the custom ops here and in `activation.rs` take).
pub(super) fn floats<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        bail!("f32 tensors only")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("contiguous tensors only")
    };
    Ok(&values[start..end])
}

/// Each column's mean and 1 / √(variance + ε) over the n rows of a row-major n × c matrix.
fn statistics(h: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (h.len() / c).max(1) as f64;
    let mut sums = vec![0f64; c];
    for row in h.chunks_exact(c) {
        for (sum, &x) in sums.iter_mut().zip(row) {
            *sum += f64::from(x);
        }
    }
    let means: Vec<f64> = sums.iter().map(|s| s / n).collect();
    let mut squares = vec![0f64; c];
    for row in h.chunks_exact(c) {
        for ((square, &x), mean) in squares.iter_mut().zip(row).zip(&means) {
            let d = f64::from(x) - mean;
            *square += d * d;
        }
    }
    let inverse = squares
        .iter()
        .map(|s| (1.0 / (s / n + EPS).sqrt()) as f32)
        .collect();
    (means.into_iter().map(|m| m as f32).collect(), inverse)
}

impl CustomOp3 for BatchNormRelu {
    fn name(&self) -> &'static str {
        "batch-norm-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c) = l1.shape().dims2()?;
        let (h, gamma, beta) = (floats(s1, l1)?, floats(s2, l2)?, floats(s3, l3)?);
        if gamma.len() != c || beta.len() != c {
            bail!(
                "batch norm: {c} columns, {} γ, {} β",
                gamma.len(),
                beta.len()
            )
        }
        let (means, inverse) = statistics(h, c);
        // y = x · scale + shift per column.
        let scale: Vec<f32> = gamma.iter().zip(&inverse).map(|(g, i)| g * i).collect();
        let shift: Vec<f32> = (0..c).map(|j| beta[j] - means[j] * scale[j]).collect();
        let mut out = Vec::with_capacity(n * c);
        for row in h.chunks_exact(c) {
            out.extend(
                row.iter()
                    .zip(&scale)
                    .zip(&shift)
                    .map(|((&x, s), t)| (x * s + t).max(0.0)),
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = h.dim(0)?;
        let gamma = gamma.flatten_all()?.to_vec1::<f32>()?;
        let all = h.apply_op3_no_bwd(out, &grad.contiguous()?, &Backward { gamma })?;
        Ok((
            Some(all.narrow(0, 0, n)?),
            Some(all.narrow(0, n, 1)?),
            Some(all.narrow(0, n + 1, 1)?),
        ))
    }
}

/// The gradients of h, γ and β from (h, output, gradient of the output), stacked: n rows of
/// h's, then γ's row, then β's. With g the output's gradient where the ReLU passed and x̂ the
/// normalised input: ∂β = Σ g, ∂γ = Σ g·x̂, ∂h = γ / (n·σ) · (n·g − ∂β − x̂·∂γ).
struct Backward {
    gamma: Vec<f32>,
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "batch-norm-relu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c) = l1.shape().dims2()?;
        let (h, out, grad) = (floats(s1, l1)?, floats(s2, l2)?, floats(s3, l3)?);
        if out.len() != n * c || grad.len() != n * c {
            bail!("batch norm backward: shapes differ")
        }
        let (means, inverse) = statistics(h, c);
        // Per row: the normalised input x̂ and the output's gradient where the ReLU passed.
        let rows = || {
            h.chunks_exact(c)
                .zip(out.chunks_exact(c))
                .zip(grad.chunks_exact(c))
        };
        let (mut d_gamma, mut d_beta) = (vec![0f32; c], vec![0f32; c]);
        for ((h, out), grad) in rows() {
            for j in 0..c {
                let g = if out[j] > 0.0 { grad[j] } else { 0.0 };
                d_beta[j] += g;
                d_gamma[j] += g * (h[j] - means[j]) * inverse[j];
            }
        }
        let size = n as f32;
        let factor: Vec<f32> = (0..c).map(|j| self.gamma[j] * inverse[j] / size).collect();
        let mut all = Vec::with_capacity((n + 2) * c);
        for ((h, out), grad) in rows() {
            all.extend((0..c).map(|j| {
                let g = if out[j] > 0.0 { grad[j] } else { 0.0 };
                let normalised = (h[j] - means[j]) * inverse[j];
                factor[j] * (size * g - d_beta[j] - normalised * d_gamma[j])
            }));
        }
        all.extend(d_gamma);
        all.extend(d_beta);
        Ok((CpuStorage::F32(all), Shape::from((n + 2, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The same values and gradients as the operation written with candle's own tensor ops.
    #[test]
    fn matches_candles_ops_forward_and_backward() -> Result<()> {
        let device = Device::Cpu;
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 * 0.61 + seed).sin() * 2.0)
                .collect()
        };
        let h = Var::from_tensor(&Tensor::from_vec(values(12 * 5, 0.3), (12, 5), &device)?)?;
        let gamma = Var::from_tensor(&Tensor::from_vec(values(5, 1.1), (1, 5), &device)?)?;
        let beta = Var::from_tensor(&Tensor::from_vec(values(5, 2.7), (1, 5), &device)?)?;
        // Weighted, so that every output's gradient differs.
        let weights = Tensor::from_vec(values(12 * 5, 4.2), (12, 5), &device)?;

        let ours = batch_norm_relu(&h, &gamma, &beta)?;
        let centered = h.broadcast_sub(&h.mean_keepdim(0)?)?;
        let variance = centered.sqr()?.mean_keepdim(0)?;
        let theirs = centered
            .broadcast_div(&(variance + 1e-5)?.sqrt()?)?
            .broadcast_mul(&gamma)?
            .broadcast_add(&beta)?
            .relu()?;
        let close = |a: &Tensor, b: &Tensor| -> Result<()> {
            let (a, b) = (
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?,
            );
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-4, "{a:?} against {b:?}");
            }
            Ok(())
        };
        close(&ours, &theirs)?;
        assert!(
            ours.flatten_all()?.to_vec1::<f32>()?.contains(&0.0),
            "some unit is cut"
        );

        let ours = (ours * &weights)?.sum_all()?.backward()?;
        let theirs = (theirs * &weights)?.sum_all()?.backward()?;
        for var in [&h, &gamma, &beta] {
            close(
                ours.get(var.as_tensor()).expect("a gradient"),
                theirs.get(var.as_tensor()).expect("a gradient"),
            )?;
        }
        Ok(())
    }
}
