//! Adam with decoupled weight decay, the update candle-nn's `AdamW` makes, done in one pass over
//! each variable's elements, in place. candle-nn's runs a dozen tensor operations per variable,
//! each allocating a tensor the size of the weights: on CTGAN's small batches that was a tenth
//! of a training step.

use candle_core::{backprop::GradStore, bail, CpuStorage, InplaceOp2, Layout, Tensor, Var};
use std::cell::RefCell;

pub struct Adam {
    variables: Vec<Moments>,
    settings: Settings,
    steps: i32,
}

#[derive(Clone, Copy)]
pub struct Settings {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// A variable and its running first and second moments.
struct Moments {
    var: Var,
    first: Vec<f32>,
    second: Vec<f32>,
}

impl Adam {
    pub fn new(vars: Vec<Var>, settings: Settings) -> Self {
        let variables = vars
            .into_iter()
            .map(|var| {
                let n = var.elem_count();
                Moments {
                    var,
                    first: vec![0.0; n],
                    second: vec![0.0; n],
                }
            })
            .collect();
        Self {
            variables,
            settings,
            steps: 0,
        }
    }

    pub fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let gradients = loss.backward()?;
        self.step(&gradients)
    }

    fn step(&mut self, gradients: &GradStore) -> candle_core::Result<()> {
        self.steps += 1;
        let Settings {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.settings;
        for moments in &mut self.variables {
            let Some(gradient) = gradients.get(moments.var.as_tensor()) else {
                continue;
            };
            let update = Update {
                moments: RefCell::new((&mut moments.first, &mut moments.second)),
                decay: (1.0 - lr * weight_decay) as f32,
                lr: lr as f32,
                beta1: beta1 as f32,
                beta2: beta2 as f32,
                scale_first: (1.0 / (1.0 - beta1.powi(self.steps))) as f32,
                scale_second: (1.0 / (1.0 - beta2.powi(self.steps))) as f32,
                eps: eps as f32,
            };
            moments
                .var
                .as_tensor()
                .inplace_op2(&gradient.contiguous()?, &update)?;
        }
        Ok(())
    }
}

/// One variable's update, with its moments (updated alongside).
struct Update<'a> {
    moments: RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    decay: f32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    scale_first: f32,
    scale_second: f32,
    eps: f32,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        weights: &mut CpuStorage,
        weights_layout: &Layout,
        gradient: &CpuStorage,
        gradient_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(weights), CpuStorage::F32(gradient)) = (weights, gradient) else {
            bail!("adam: f32 weights and gradients only");
        };
        let (Some((w0, w1)), Some((g0, g1))) = (
            weights_layout.contiguous_offsets(),
            gradient_layout.contiguous_offsets(),
        ) else {
            bail!("adam: contiguous weights and gradients only");
        };
        let mut moments = self.moments.borrow_mut();
        let (first, second) = &mut *moments;
        let (weights, gradient) = (&mut weights[w0..w1], &gradient[g0..g1]);
        if weights.len() != gradient.len() || first.len() != weights.len() {
            bail!("adam: a gradient's size differs from its variable's");
        }
        for (((w, &g), m), v) in weights
            .iter_mut()
            .zip(gradient)
            .zip(first.iter_mut())
            .zip(second.iter_mut())
        {
            *m = *m * self.beta1 + g * (1.0 - self.beta1);
            *v = *v * self.beta2 + g * g * (1.0 - self.beta2);
            let step = (*m * self.scale_first) / ((*v * self.scale_second).sqrt() + self.eps);
            *w = *w * self.decay - step * self.lr;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    /// The same steps as candle-nn's `AdamW` on the same losses, to float precision.
    #[test]
    fn steps_as_candle_nn_adamw_does() -> candle_core::Result<()> {
        let settings = Settings {
            lr: 0.05,
            beta1: 0.5,
            beta2: 0.9,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let start = Tensor::new(&[[0.5f32, -1.0, 2.0], [3.0, 0.0, -0.25]], &Device::Cpu)?;
        let ours = Var::from_tensor(&start)?;
        let theirs = Var::from_tensor(&start)?;
        let mut adam = Adam::new(vec![ours.clone()], settings);
        let mut adamw = AdamW::new(
            vec![theirs.clone()],
            ParamsAdamW {
                lr: settings.lr,
                beta1: settings.beta1,
                beta2: settings.beta2,
                eps: settings.eps,
                weight_decay: settings.weight_decay,
            },
        )?;
        // A loss whose gradient changes with the weights, through a transpose (a strided
        // gradient).
        let loss = |var: &Var| -> candle_core::Result<Tensor> {
            (var.as_tensor().t()?.sqr()? * 3.0)?.sum_all()? + var.as_tensor().sum_all()?
        };
        for _ in 0..5 {
            adam.backward_step(&loss(&ours)?)?;
            adamw.backward_step(&loss(&theirs)?)?;
        }
        let (ours, theirs) = (
            ours.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            theirs.as_tensor().flatten_all()?.to_vec1::<f32>()?,
        );
        assert_ne!(ours, start.flatten_all()?.to_vec1::<f32>()?);
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-5, "{ours:?} against {theirs:?}");
        }
        Ok(())
    }
}
