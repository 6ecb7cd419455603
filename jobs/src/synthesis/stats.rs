//! Numerical building blocks: the normal distribution, seeded sampling, small dense linear
//! algebra (Cholesky, symmetric eigen-decomposition, nearest correlation matrix) and
//! Kendall's tau. Dense matrices are row-major `Vec<f64>` of side `d`.

use rand::{rngs::StdRng, Rng};
use std::f64::consts::{PI, SQRT_2};

/// Φ(x), the standard normal CDF (relative error below 1.2e-7).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / SQRT_2)
}

/// The standard normal density.
pub fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * PI).sqrt()
}

/// Complementary error function (Numerical Recipes' Chebyshev fit).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Φ⁻¹(p) for p in (0, 1) (Acklam's rational approximation, relative error below 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-15, 1.0 - 1e-15);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const LOW: f64 = 0.024_25;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// E[Z | a < Z < b] for a standard normal Z, with Φ(a) = `lo`, Φ(b) = `hi`: the score of a
/// value that occupies the CDF interval `[lo, hi]`.
pub fn interval_mean(lo: f64, hi: f64) -> f64 {
    if hi - lo < 1e-9 {
        return normal_quantile((lo + hi) / 2.0);
    }
    let density = |p: f64| {
        if p <= 0.0 || p >= 1.0 {
            0.0
        } else {
            normal_pdf(normal_quantile(p))
        }
    };
    (density(lo) - density(hi)) / (hi - lo)
}

/// A standard normal draw (Box–Muller).
pub fn standard_normal(rng: &mut StdRng) -> f64 {
    let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let v: f64 = rng.random::<f64>();
    (-2.0 * u.ln()).sqrt() * (2.0 * PI * v).cos()
}

/// A Laplace(0, scale) draw.
pub fn laplace(rng: &mut StdRng, scale: f64) -> f64 {
    let u: f64 = rng.random::<f64>() - 0.5;
    -scale * u.signum() * (1.0 - 2.0 * u.abs()).max(f64::MIN_POSITIVE).ln()
}

/// Lower-triangular L with L·Lᵀ = `m`; None when `m` is not positive definite.
pub fn cholesky(m: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            if i == j {
                let v = m[i * d + i] - dot;
                if v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = (m[i * d + j] - dot) / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// Eigenvalues and eigenvectors (columns of the returned matrix) of a symmetric matrix, by
/// cyclic Jacobi rotations: exact enough and simple for the tens of columns a table has.
pub fn symmetric_eigen(m: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = identity(d);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

pub fn identity(d: usize) -> Vec<f64> {
    let mut m = vec![0.0; d * d];
    for i in 0..d {
        m[i * d + i] = 1.0;
    }
    m
}

/// The correlation matrix nearest in spirit to `m`: symmetric, eigenvalues at least `floor`,
/// unit diagonal. Estimated (pairwise, corrected, or noisy) correlations need not be
/// positive definite; the copula's Cholesky factor needs them to be.
pub fn nearest_correlation(m: &[f64], d: usize, floor: f64) -> Vec<f64> {
    let mut sym = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            let v = 0.5 * (m[i * d + j] + m[j * d + i]);
            sym[i * d + j] = if i == j { 1.0 } else { v.clamp(-1.0, 1.0) };
        }
    }
    let (values, vectors) = symmetric_eigen(&sym, d);
    let mut out = vec![0.0; d * d];
    for (k, &lambda) in values.iter().enumerate() {
        let lambda = lambda.max(floor);
        for i in 0..d {
            for j in 0..d {
                out[i * d + j] += lambda * vectors[i * d + k] * vectors[j * d + k];
            }
        }
    }
    let diag: Vec<f64> = (0..d).map(|i| out[i * d + i].sqrt()).collect();
    for i in 0..d {
        for j in 0..d {
            out[i * d + j] = if i == j {
                1.0
            } else {
                out[i * d + j] / (diag[i] * diag[j])
            };
        }
    }
    out
}

/// Kendall's tau-a, (concordant − discordant) / (n choose 2), in O(n log n) (Knight's
/// algorithm). Its sensitivity to one changed row is 4/n, which the DP copula relies on.
pub fn kendall_tau_a(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len();
    if n < 2 {
        return 0.0;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]).then(y[i].total_cmp(&y[j])));
    let pairs = (n * (n - 1) / 2) as f64;
    let tied = |keys: &mut dyn Iterator<Item = (f64, f64)>, both: bool| -> f64 {
        let mut total = 0.0;
        let mut run = 0usize;
        let mut previous: Option<(f64, f64)> = None;
        for key in keys {
            let same = previous.is_some_and(|p| p.0 == key.0 && (!both || p.1 == key.1));
            if same {
                run += 1;
            } else {
                total += (run * run.saturating_sub(1) / 2) as f64;
                run = 1;
            }
            previous = Some(key);
        }
        total + (run * run.saturating_sub(1) / 2) as f64
    };
    let x_ties = tied(&mut order.iter().map(|&i| (x[i], 0.0)), false);
    let joint_ties = tied(&mut order.iter().map(|&i| (x[i], y[i])), true);
    let mut ys: Vec<f64> = order.iter().map(|&i| y[i]).collect();
    let swaps = merge_sort_swaps(&mut ys) as f64;
    let y_ties = tied(&mut ys.iter().map(|&v| (v, 0.0)), false);
    (pairs - x_ties - y_ties + joint_ties - 2.0 * swaps) / pairs
}

/// Sorts `v` and returns the number of inversions (pairs out of order, ties not counted).
fn merge_sort_swaps(v: &mut [f64]) -> u64 {
    let n = v.len();
    if n < 2 {
        return 0;
    }
    let mid = n / 2;
    let mut swaps = merge_sort_swaps(&mut v[..mid]) + merge_sort_swaps(&mut v[mid..]);
    let mut merged = Vec::with_capacity(n);
    let (mut i, mut j) = (0, mid);
    while i < mid && j < n {
        if v[j] < v[i] {
            merged.push(v[j]);
            swaps += (mid - i) as u64;
            j += 1;
        } else {
            merged.push(v[i]);
            i += 1;
        }
    }
    merged.extend_from_slice(&v[i..mid]);
    merged.extend_from_slice(&v[j..n]);
    v.copy_from_slice(&merged);
    swaps
}

/// Pearson correlation over the pairs where both are present; 0 when either is constant.
pub fn pearson(x: &[Option<f64>], y: &[Option<f64>]) -> Option<f64> {
    let pairs: Vec<(f64, f64)> = x
        .iter()
        .zip(y)
        .filter_map(|(a, b)| Some(((*a)?, (*b)?)))
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .collect();
    if pairs.len() < 2 {
        return None;
    }
    let n = pairs.len() as f64;
    let (mx, my) = pairs
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (a, b)| (sx + a / n, sy + b / n));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in &pairs {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx <= 0.0 || syy <= 0.0 {
        return Some(0.0);
    }
    Some((sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn normal_quantile_inverts_the_cdf() {
        for p in [1e-6, 0.001, 0.02, 0.2, 0.5, 0.77, 0.99, 0.999_99] {
            let x = normal_quantile(p);
            let tolerance = 3e-7 * p.min(1.0 - p);
            assert!((normal_cdf(x) - p).abs() < tolerance, "p={p} x={x}");
        }
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        assert!(normal_quantile(0.5).abs() < 1e-9);
    }

    #[test]
    fn interval_means_average_to_zero_and_match_the_half_normal() {
        // E[Z | Z > 0] = sqrt(2/π).
        assert!((interval_mean(0.5, 1.0) - (2.0 / PI).sqrt()).abs() < 1e-6);
        let cuts = [0.0, 0.1, 0.35, 0.8, 1.0];
        let mean: f64 = cuts
            .windows(2)
            .map(|w| (w[1] - w[0]) * interval_mean(w[0], w[1]))
            .sum();
        assert!(mean.abs() < 1e-6, "{mean}");
    }

    #[test]
    fn samplers_have_the_right_moments() {
        let mut rng = StdRng::seed_from_u64(7);
        let n = 200_000;
        let z: Vec<f64> = (0..n).map(|_| standard_normal(&mut rng)).collect();
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
        // Laplace(0, b): E|X| = b.
        let b = 2.5;
        let abs_mean = (0..n).map(|_| laplace(&mut rng, b).abs()).sum::<f64>() / n as f64;
        assert!((abs_mean - b).abs() < 0.05, "{abs_mean}");
    }

    #[test]
    fn cholesky_reconstructs_and_refuses_indefinite_matrices() {
        let m = [4.0, 2.0, 0.6, 2.0, 2.0, 0.5, 0.6, 0.5, 3.0];
        let l = cholesky(&m, 3).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let v: f64 = (0..3).map(|k| l[i * 3 + k] * l[j * 3 + k]).sum();
                assert!((v - m[i * 3 + j]).abs() < 1e-12);
            }
        }
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
    }

    #[test]
    fn nearest_correlation_repairs_an_indefinite_matrix() {
        // Pairwise-consistent-looking but impossible: a~b, b~c strongly, a~c strongly negative.
        let m = [1.0, 0.9, -0.9, 0.9, 1.0, 0.9, -0.9, 0.9, 1.0];
        assert!(cholesky(&m, 3).is_none());
        let fixed = nearest_correlation(&m, 3, 1e-6);
        assert!(cholesky(&fixed, 3).is_some());
        assert_eq!(fixed[4], 1.0);
        // A valid matrix comes back unchanged.
        let ok = [1.0, 0.3, 0.3, 1.0];
        let same = nearest_correlation(&ok, 2, 1e-6);
        assert!((same[1] - 0.3).abs() < 1e-9);
    }

    #[test]
    fn kendall_tau_matches_the_quadratic_definition() {
        let mut rng = StdRng::seed_from_u64(3);
        let x: Vec<f64> = (0..300)
            .map(|_| (rng.random::<f64>() * 10.0).floor())
            .collect();
        let y: Vec<f64> = x
            .iter()
            .map(|v| (v + rng.random::<f64>() * 6.0).floor())
            .collect();
        let mut sum = 0.0;
        for i in 0..x.len() {
            for j in i + 1..x.len() {
                sum += (x[i] - x[j]).signum()
                    * (y[i] - y[j]).signum()
                    * ((x[i] != x[j]) as i32 as f64)
                    * ((y[i] != y[j]) as i32 as f64);
            }
        }
        let pairs = (x.len() * (x.len() - 1) / 2) as f64;
        let fast = kendall_tau_a(&x, &y);
        assert!(
            (fast - sum / pairs).abs() < 1e-12,
            "{fast} vs {}",
            sum / pairs
        );
        assert!(fast > 0.3);
    }

    #[test]
    fn pearson_skips_missing_pairs() {
        let x = [Some(1.0), Some(2.0), None, Some(4.0)];
        let y = [Some(2.0), Some(4.0), Some(100.0), Some(8.0)];
        assert!((pearson(&x, &y).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[Some(1.0)], &[Some(1.0)]), None);
    }
}
