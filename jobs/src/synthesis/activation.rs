//! CTGAN's output layer as one operation each way: the activation (tanh for each continuous
//! column's offset, Gumbel-softmax for each one-hot group) and the cross-entropy of the
//! conditioned groups. As candle operations these were, for every column, a narrow, an
//! activation of five or six passes into new tensors and a concatenation, and as many again
//! backward: most of a generator step's operations, on slices a few values wide. Here each is
//! one pass over the rows.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::norm::floats;

/// Part of a row: an offset, squashed by tanh, or a group of logits turned into one soft
/// one-hot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Span {
    Tanh(usize),
    Softmax { start: usize, len: usize },
}

impl Span {
    /// One past the span's last position.
    fn end(self) -> usize {
        match self {
            Span::Tanh(at) => at + 1,
            Span::Softmax { start, len } => start + len,
        }
    }
}

/// Each row of `raw` (n × width) with tanh over its offsets and softmax((raw + gumbel) / τ)
/// over its groups; a position in no span is passed through.
pub(super) fn activate(raw: &Tensor, gumbel: &Tensor, spans: &[Span], tau: f32) -> Result<Tensor> {
    let op = Activation {
        spans: spans.into(),
        tau,
    };
    raw.contiguous()?.apply_op2(&gumbel.contiguous()?, op)
}

/// −(1/n) Σ over rows of log softmax(the row's group)[its slot]: the cross-entropy of each
/// row's conditioned group (start, len) against the level (slot) it was asked for.
pub(super) fn cross_entropy(raw: &Tensor, targets: &[(usize, usize, usize)]) -> Result<Tensor> {
    let op = CrossEntropy {
        targets: targets.into(),
    };
    raw.contiguous()?.apply_op1(op)
}

struct Activation {
    spans: Arc<[Span]>,
    tau: f32,
}

struct CrossEntropy {
    targets: Arc<[(usize, usize, usize)]>,
}

/// A tensor's elements, row-major (a copy).
fn elements(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// softmax(x / τ) into `out`, stable for large logits.
fn softmax(x: impl Iterator<Item = f32> + Clone, tau: f32, out: &mut [f32]) {
    let max = x.clone().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for (o, v) in out.iter_mut().zip(x) {
        *o = ((v - max) / tau).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

impl CustomOp2 for Activation {
    fn name(&self) -> &'static str {
        "ctgan-activation"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (raw, gumbel) = (floats(s1, l1)?, floats(s2, l2)?);
        let (n, width) = l1.shape().dims2()?;
        if l2.shape().dims2()? != (n, width) {
            bail!("activation: noise of another shape")
        }
        if width == 0 || self.spans.iter().any(|span| span.end() > width) {
            bail!(
                "activation: spans {:?} in rows of {width} values",
                self.spans
            )
        }
        let mut out = raw.to_vec();
        for ((y, x), g) in out
            .chunks_exact_mut(width)
            .zip(raw.chunks_exact(width))
            .zip(gumbel.chunks_exact(width))
        {
            for &span in self.spans.iter() {
                match span {
                    Span::Tanh(at) => y[at] = x[at].tanh(),
                    Span::Softmax { start, len } => {
                        let group = start..start + len;
                        let logits = x[group.clone()].iter().zip(&g[group.clone()]);
                        softmax(logits.map(|(x, g)| x + g), self.tau, &mut y[group]);
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// tanh′ = 1 − y²; softmax′ applied to g: y ⊙ (g − ⟨g, y⟩) / τ. The noise gets none.
    fn bwd(
        &self,
        raw: &Tensor,
        _: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (y, mut d) = (elements(res)?, elements(grad)?);
        let width = raw.dims2()?.1;
        for (d, y) in d.chunks_exact_mut(width).zip(y.chunks_exact(width)) {
            for &span in self.spans.iter() {
                match span {
                    Span::Tanh(at) => d[at] *= 1.0 - y[at] * y[at],
                    Span::Softmax { start, len } => {
                        let (d, y) = (&mut d[start..start + len], &y[start..start + len]);
                        let dot: f32 = d.iter().zip(y).map(|(g, y)| g * y).sum();
                        for (g, y) in d.iter_mut().zip(y) {
                            *g = y * (*g - dot) / self.tau;
                        }
                    }
                }
            }
        }
        Ok((Some(Tensor::from_vec(d, raw.shape(), raw.device())?), None))
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "ctgan-condition-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let raw = floats(storage, layout)?;
        let (n, width) = layout.shape().dims2()?;
        if n != self.targets.len() {
            bail!("cross-entropy: {} targets for {n} rows", self.targets.len())
        }
        if width == 0 {
            bail!("cross-entropy: rows of no values")
        }
        if let Some(&(start, len, slot)) = self
            .targets
            .iter()
            .find(|&&(start, len, slot)| len == 0 || slot >= len || start + len > width)
        {
            bail!("cross-entropy: slot {slot} of {len} at {start} in rows of {width}")
        }
        let mut total = 0f64;
        for (x, &(start, len, slot)) in raw.chunks_exact(width).zip(self.targets.iter()) {
            let group = &x[start..start + len];
            let max = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = group.iter().map(|v| (v - max).exp()).sum();
            total -= f64::from(group[slot] - max - sum.ln());
        }
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    /// (softmax − one-hot) / n within each row's group, zero elsewhere.
    fn bwd(&self, raw: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, width) = raw.dims2()?;
        let scale = grad.to_scalar::<f32>()? / n as f32;
        let x = elements(raw)?;
        let mut d = vec![0f32; n * width];
        for ((d, x), &(start, len, slot)) in d
            .chunks_exact_mut(width)
            .zip(x.chunks_exact(width))
            .zip(self.targets.iter())
        {
            let group = &mut d[start..start + len];
            softmax(x[start..start + len].iter().copied(), 1.0, group);
            group[slot] -= 1.0;
            group.iter_mut().for_each(|g| *g *= scale);
        }
        Ok(Some(Tensor::from_vec(d, raw.shape(), raw.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::ops::{log_softmax, softmax};

    const SPANS: [Span; 4] = [
        Span::Tanh(0),
        Span::Softmax { start: 1, len: 3 },
        Span::Softmax { start: 4, len: 2 },
        Span::Tanh(6),
    ];

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| 3.0 * (i as f32 * 0.71 + seed).sin())
            .collect()
    }

    fn gradient(grads: &candle_core::backprop::GradStore, of: &Var) -> Vec<f32> {
        elements(grads.get(of.as_tensor()).unwrap()).unwrap()
    }

    fn close(ours: &[f32], theirs: &[f32], what: &str) {
        assert_eq!(ours.len(), theirs.len());
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!((a - b).abs() < 1e-4, "{what}[{i}]: {a} against {b}");
        }
    }

    /// Values and gradients as candle's operations give them, column by column.
    #[test]
    fn the_activation_matches_candles_operations() {
        let device = Device::Cpu;
        let (n, width, tau) = (5, 7, 0.2f32);
        let raw = Var::from_vec(values(n * width, 0.3), (n, width), &device).unwrap();
        let gumbel = Tensor::from_vec(values(n * width, 1.7), (n, width), &device).unwrap();
        let weights = Tensor::from_vec(values(n * width, 2.9), (n, width), &device).unwrap();

        let ours = activate(&raw, &gumbel, &SPANS, tau).unwrap();
        let noisy = ((raw.as_tensor() + &gumbel).unwrap() / f64::from(tau)).unwrap();
        let mut parts = Vec::new();
        for span in SPANS {
            parts.push(match span {
                Span::Tanh(at) => raw.narrow(1, at, 1).unwrap().tanh().unwrap(),
                Span::Softmax { start, len } => {
                    softmax(&noisy.narrow(1, start, len).unwrap(), 1).unwrap()
                }
            });
        }
        let theirs = Tensor::cat(&parts, 1).unwrap();
        close(
            &elements(&ours).unwrap(),
            &elements(&theirs).unwrap(),
            "value",
        );

        let loss = |t: &Tensor| (t * &weights).unwrap().sum_all().unwrap();
        let ours = loss(&ours).backward().unwrap();
        let theirs = loss(&theirs).backward().unwrap();
        close(&gradient(&ours, &raw), &gradient(&theirs, &raw), "gradient");
    }

    /// The loss and its gradient as log-softmax against one-hot targets gives them.
    #[test]
    fn the_cross_entropy_matches_candles_log_softmax() {
        let device = Device::Cpu;
        let (n, width) = (4, 7);
        let raw = Var::from_vec(values(n * width, 0.8), (n, width), &device).unwrap();
        let targets = [(1, 3, 2), (4, 2, 0), (1, 3, 0), (4, 2, 1)];

        let ours = cross_entropy(&raw, &targets).unwrap();
        let mut total = Tensor::zeros((), candle_core::DType::F32, &device).unwrap();
        for (row, &(start, len, slot)) in targets.iter().enumerate() {
            let logits = raw
                .narrow(0, row, 1)
                .unwrap()
                .narrow(1, start, len)
                .unwrap();
            let picked = log_softmax(&logits, 1).unwrap().narrow(1, slot, 1).unwrap();
            total = (total + picked.sum_all().unwrap()).unwrap();
        }
        let theirs = (total.neg().unwrap() / n as f64).unwrap();
        close(
            &[ours.to_scalar::<f32>().unwrap()],
            &[theirs.to_scalar::<f32>().unwrap()],
            "loss",
        );

        let ours = (ours * 3.0).unwrap().backward().unwrap();
        let theirs = (theirs * 3.0).unwrap().backward().unwrap();
        close(&gradient(&ours, &raw), &gradient(&theirs, &raw), "gradient");
    }
}
