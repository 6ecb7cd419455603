//! A matrix product whose backward pass computes only the gradients something needs.
//! candle's own computes both operands' gradients whatever they are: in a GAN step that is
//! the gradient of the noise, of the real rows, and of the frozen critic's weights while the
//! generator trains — about a seventh of CTGAN's matrix work, thrown away. CTGAN's and TVAE's
//! layers go through it.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use candle_nn::Linear;

/// `a · b` for two f32 (or two f64) matrices, on the calling thread (the networks' matrices
/// are small: splitting them costs more than it gains).
pub(super) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.apply_op2(b, Product)
}

/// A linear layer: `x · Wᵀ + bias`, through [`matmul`].
pub(super) fn dense(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let product = matmul(x, &layer.weight().t()?)?;
    match layer.bias() {
        Some(bias) => product.broadcast_add(bias),
        None => Ok(product),
    }
}

struct Product;

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "matmul-needed-gradients"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            bail!("matmul: {m}x{k} times {k2}x{n}")
        }
        let product = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(multiply((a, l1), (b, l2), (m, k, n), (0.0, 1.0)))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(multiply((a, l1), (b, l2), (m, k, n), (0.0, 1.0)))
            }
            _ => bail!("matmul: f32 or f64 matrices of one type"),
        };
        Ok((product, Shape::from((m, n))))
    }

    /// A constant operand (one no variable leads to) gets no gradient.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let of_a = match a.track_op() {
            true => Some(matmul(grad, &b.t()?)?),
            false => None,
        };
        let of_b = match b.track_op() {
            true => Some(matmul(&a.t()?, grad)?),
            false => None,
        };
        Ok((of_a, of_b))
    }
}

/// The m × n product, row-major, of an m × k and a k × n matrix laid out as their layouts say.
fn multiply<T: Copy + 'static>(
    (a, a_layout): (&[T], &Layout),
    (b, b_layout): (&[T], &Layout),
    (m, k, n): (usize, usize, usize),
    (zero, one): (T, T),
) -> Vec<T> {
    let a = &a[a_layout.start_offset()..];
    let b = &b[b_layout.start_offset()..];
    let (a_rows, a_cols) = (a_layout.stride()[0] as isize, a_layout.stride()[1] as isize);
    let (b_rows, b_cols) = (b_layout.stride()[0] as isize, b_layout.stride()[1] as isize);
    // gemm writes every element of the destination when it does not read it (k > 0), so a
    // product needs no zeros beforehand; but its matrix-vector paths (m or n of 1) view the
    // destination as a slice first, which wants initialised memory.
    let mut product = if k == 0 || m == 1 || n == 1 {
        vec![zero; m * n]
    } else {
        Vec::with_capacity(m * n)
    };
    if k == 0 {
        return product;
    }
    // SAFETY: the layouts are the operands' own, checked by candle against their storages;
    // the destination is m × n, row-major, and only written (alpha = 0, no read), every
    // element of it (k > 0).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            product.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cols,
            a_rows,
            b.as_ptr(),
            b_cols,
            b_rows,
            zero,
            one,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        product.set_len(m * n);
    }
    product
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Var};

    /// Values and gradients as candle's own product gives them; a constant operand gets none.
    #[test]
    fn matches_candles_product_and_skips_constants() {
        let device = Device::Cpu;
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
        };
        let x = Tensor::from_vec(values(5 * 7, 0.1), (5, 7), &device).unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(values(3 * 7, 0.9), (3, 7), &device).unwrap())
            .unwrap();
        let ours = matmul(&x, &w.t().unwrap()).unwrap();
        let theirs = x.matmul(&w.t().unwrap()).unwrap();
        let difference = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(difference.to_scalar::<f32>().unwrap() < 1e-5);

        let ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let theirs = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gradient = |grads: &candle_core::backprop::GradStore| {
            grads
                .get(w.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        for (a, b) in gradient(&ours).iter().zip(gradient(&theirs)) {
            assert!((a - b).abs() < 1e-4, "{a} against {b}");
        }
        assert!(ours.get(&x).is_none());
        assert!(
            theirs.get(&x).is_some(),
            "candle's own product differentiates the constant"
        );
    }

    /// A layer through `dense` computes what candle's `Linear` does.
    #[test]
    fn dense_is_a_linear_layer() {
        let device = Device::Cpu;
        let x = Tensor::arange(0f32, 12.0, &device)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let w = Tensor::arange(0f32, 8.0, &device)
            .unwrap()
            .reshape((2, 4))
            .unwrap();
        let bias = Tensor::new(&[0.5f32, -1.0], &device).unwrap();
        let layer = Linear::new(w, Some(bias));
        let ours = dense(&layer, &x).unwrap().to_vec2::<f32>().unwrap();
        let theirs = layer.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(ours, theirs);
    }
}
