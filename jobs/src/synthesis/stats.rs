//! Numerical building blocks. The normal distribution is statrs'. Kept, because no crate in
//! the tree does them: small dense linear algebra (Cholesky, symmetric eigen-decomposition,
//! nearest correlation matrix; nalgebra would bring a whole linear-algebra stack for matrices
//! of tens of columns), Kendall's tau-a in O(n log n) (the DP copula relies on tau-a's 4/n
//! sensitivity; crates compute tau-b), Pearson over pairwise-complete rows, the Laplace noise
//! of the DP mechanisms. Normal draws are rand_distr's. Dense matrices are row-major `Vec<f64>`
//! of side `d`.

use rand::{rngs::StdRng, Rng};
use rand_distr::StandardNormal;
use statrs::distribution::{Continuous, ContinuousCDF, Normal};

/// Φ(x), the standard normal CDF.
pub fn normal_cdf(x: f64) -> f64 {
    Normal::standard().cdf(x)
}

/// Φ tabulated and linearly interpolated, for samplers that map millions of normals: a table
/// read is a few times faster than the series behind [`normal_cdf`]. The error is below 3e-8
/// (a linear interpolant errs by at most h²/8 · max |φ′| with h the table's step).
pub struct NormalTable {
    values: Vec<f64>,
}

impl NormalTable {
    /// The table spans ±LIMIT; beyond, Φ is 0 or 1 to within 1.3e-12.
    pub const LIMIT: f64 = 7.0;
    const POINTS: usize = 16384;

    /// The one table, built on first use.
    pub fn shared() -> &'static NormalTable {
        static TABLE: std::sync::OnceLock<NormalTable> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| {
            let values = (0..Self::POINTS)
                .map(|i| normal_cdf(-Self::LIMIT + i as f64 * Self::step()))
                .collect();
            NormalTable { values }
        })
    }

    fn step() -> f64 {
        2.0 * Self::LIMIT / (Self::POINTS - 1) as f64
    }

    /// Φ(z).
    pub fn cdf(&self, z: f64) -> f64 {
        let x = (z.clamp(-Self::LIMIT, Self::LIMIT) + Self::LIMIT) / Self::step();
        let i = (x as usize).min(Self::POINTS - 2);
        let (a, b) = (self.values[i], self.values[i + 1]);
        a + (b - a) * (x - i as f64)
    }

    /// Φ⁻¹(p), within ±LIMIT.
    pub fn quantile(&self, p: f64) -> f64 {
        let i = self
            .values
            .partition_point(|&v| v < p)
            .clamp(1, Self::POINTS - 1);
        let (a, b) = (self.values[i - 1], self.values[i]);
        let within = if b > a {
            ((p - a) / (b - a)).clamp(0.0, 1.0)
        } else {
            0.5
        };
        -Self::LIMIT + (i as f64 - 1.0 + within) * Self::step()
    }
}

/// Φ⁻¹(p), kept finite: p is clamped to [1e-15, 1 − 1e-15].
pub fn normal_quantile(p: f64) -> f64 {
    Normal::standard().inverse_cdf(p.clamp(1e-15, 1.0 - 1e-15))
}

/// E[Z | a < Z < b] for a standard normal Z, with Φ(a) = `lo`, Φ(b) = `hi`: the score of a
/// value that occupies the CDF interval `[lo, hi]`. (No crate has it: it is φ(a) − φ(b) over
/// the interval's probability, from the pieces above.)
pub fn interval_mean(lo: f64, hi: f64) -> f64 {
    if hi - lo < 1e-9 {
        return normal_quantile((lo + hi) / 2.0);
    }
    let density = |p: f64| {
        if p <= 0.0 || p >= 1.0 {
            0.0
        } else {
            Normal::standard().pdf(normal_quantile(p))
        }
    };
    (density(lo) - density(hi)) / (hi - lo)
}

/// A standard normal draw (rand_distr's ziggurat).
pub fn standard_normal(rng: &mut StdRng) -> f64 {
    rng.sample(StandardNormal)
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

/// Concordant minus discordant pairs, in O(n log n) (Knight's algorithm). One changed row
/// moves it by at most 2(n − 1), which the DP copula relies on.
pub fn kendall_score(x: &[f64], y: &[f64]) -> i64 {
    let n = x.len();
    if n < 2 {
        return 0;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]).then(y[i].total_cmp(&y[j])));
    let pairs = (n * (n - 1) / 2) as u64;
    let tied = |keys: &mut dyn Iterator<Item = (f64, f64)>, both: bool| -> u64 {
        let mut total = 0;
        let mut run = 0usize;
        let mut previous: Option<(f64, f64)> = None;
        for key in keys {
            let same = previous.is_some_and(|p| p.0 == key.0 && (!both || p.1 == key.1));
            if same {
                run += 1;
            } else {
                total += (run * run.saturating_sub(1) / 2) as u64;
                run = 1;
            }
            previous = Some(key);
        }
        total + (run * run.saturating_sub(1) / 2) as u64
    };
    let x_ties = tied(&mut order.iter().map(|&i| (x[i], 0.0)), false);
    let joint_ties = tied(&mut order.iter().map(|&i| (x[i], y[i])), true);
    let mut ys: Vec<f64> = order.iter().map(|&i| y[i]).collect();
    let swaps = merge_sort_swaps(&mut ys);
    let y_ties = tied(&mut ys.iter().map(|&v| (v, 0.0)), false);
    (pairs + joint_ties) as i64 - (x_ties + y_ties + 2 * swaps) as i64
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

    #[test]
    fn the_normal_table_matches_the_exact_cdf_and_inverts_it() {
        let table = NormalTable::shared();
        for i in 0..=2000 {
            let z = -8.0 + i as f64 * 0.008;
            let error = (table.cdf(z) - normal_cdf(z)).abs();
            assert!(error < 3e-8, "Φ({z}): off by {error}");
        }
        for p in [1e-9, 0.001, 0.1, 0.3, 0.5, 0.77, 0.999, 1.0 - 1e-9] {
            let z = table.quantile(p);
            assert!((z - normal_quantile(p)).abs() < 1e-3, "Φ⁻¹({p}) = {z}");
        }
    }
    use rand::SeedableRng;
    use std::f64::consts::PI;

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
    fn kendall_score_matches_the_quadratic_definition() {
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
        let fast = kendall_score(&x, &y);
        assert_eq!(fast as f64, sum);
        assert!(fast as f64 / pairs > 0.3);
    }

    #[test]
    fn pearson_skips_missing_pairs() {
        let x = [Some(1.0), Some(2.0), None, Some(4.0)];
        let y = [Some(2.0), Some(4.0), Some(100.0), Some(8.0)];
        assert!((pearson(&x, &y).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[Some(1.0)], &[Some(1.0)]), None);
    }
}
