//! Differential privacy's building blocks, exact where floating point would leak (Mironov,
//! "On significance of the least significant bits for differential privacy", CCS 2012):
//!
//! - noise comes from the operating system's CSPRNG, never from the job's seed: the seed
//!   fixes everything else (split, sampling), so it can be printed without undoing the noise.
//!   A job's noise is ChaCha20 from a seed its first attempt drew from the operating system
//!   and the control plane keeps (`shared::noise_seeds`), never shown: a retry releases the
//!   same values, not the same data once more;
//! - ε is an exact fraction, split exactly between the parts that spend it;
//! - every noisy quantity is an integer (a count, or Kendall's concordance score) with
//!   discrete Laplace noise drawn by Canonne, Kamath & Steinke's sampler ("The Discrete
//!   Gaussian for Differential Privacy", NeurIPS 2020, Algorithms 1 and 2), which uses
//!   integer arithmetic only, as OpenDP's samplers do;
//! - bounds come from a noisy histogram over a fixed geometric grid, the outermost bins above
//!   a threshold (as the ApproxBounds of Google's differential-privacy library);
//! - level sets not declared are the levels whose noisy count clears a threshold set by δ
//!   (Korolova et al., "Releasing search queries and clicks privately", WWW 2009).
//!
//! Neighbouring tables differ in one row replaced (the row count is public): a histogram
//! moves by at most 2 in L1, a concordance score by at most 2(n − 1).

use rand::{rngs::OsRng, RngCore, SeedableRng, TryRngCore};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

/// ε as the exact fraction `num / den`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epsilon {
    num: u64,
    den: u64,
}

impl Epsilon {
    /// Resolution of an ε given as a decimal.
    const GRAIN: u64 = 1 << 20;

    /// The largest multiple of 2⁻²⁰ not above `epsilon` (spending a hair less than asked
    /// keeps the promise); None below 2⁻²⁰.
    pub fn at_most(epsilon: f64) -> Option<Epsilon> {
        let num = (epsilon * Self::GRAIN as f64).floor();
        (num >= 1.0 && num < u32::MAX as f64).then(|| {
            Epsilon {
                num: num as u64,
                den: Self::GRAIN,
            }
            .share(1, 1)
        })
    }

    /// `parts / of` of this budget.
    pub fn share(self, parts: u64, of: u64) -> Epsilon {
        let (num, den) = (self.num * parts, self.den * of);
        let g = gcd(num, den);
        Epsilon {
            num: num / g,
            den: den / g,
        }
    }

    pub fn minus(self, other: Epsilon) -> Epsilon {
        let den = self.den / gcd(self.den, other.den) * other.den;
        let num = self.num * (den / self.den) - other.num * (den / other.den);
        Epsilon { num, den }.share(1, 1)
    }

    pub fn plus(self, other: Epsilon) -> Epsilon {
        let den = self.den / gcd(self.den, other.den) * other.den;
        let num = self.num * (den / self.den) + other.num * (den / other.den);
        Epsilon { num, den }.share(1, 1)
    }

    pub fn value(self) -> f64 {
        self.num as f64 / self.den as f64
    }

    pub fn is_zero(self) -> bool {
        self.num == 0
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// One noisy release: what it is, the ε it spent, its sensitivity and the noise's scale.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Spend {
    pub what: String,
    pub epsilon: f64,
    pub sensitivity: u64,
    /// b of the discrete Laplace noise, P(k) ∝ exp(−|k| / b).
    pub noise_scale: f64,
}

/// Randomness for noise, read in blocks from the operating system or from a kept seed.
pub struct Noise {
    block: [u64; 64],
    used: usize,
    /// None: the operating system's.
    seeded: Option<ChaCha20Rng>,
    spent: Vec<Spend>,
}

impl Noise {
    pub fn from_os() -> Noise {
        Noise {
            block: [0; 64],
            used: 64,
            seeded: None,
            spent: Vec::new(),
        }
    }

    /// The same noise for the same seed, which must come from the operating system and stay
    /// secret as the rows it guards.
    pub fn from_seed(seed: [u8; 32]) -> Noise {
        Noise {
            seeded: Some(ChaCha20Rng::from_seed(seed)),
            ..Noise::from_os()
        }
    }

    /// A seed for [`Noise::from_seed`], from the operating system.
    pub fn fresh_seed() -> [u8; 32] {
        let mut seed = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut seed)
            .expect("the operating system's random source is unavailable");
        seed
    }

    /// Every release so far, in order.
    pub fn into_spent(self) -> Vec<Spend> {
        self.spent
    }

    fn next_u64(&mut self) -> u64 {
        if self.used == self.block.len() {
            let mut bytes = [0u8; 512];
            match &mut self.seeded {
                Some(rng) => rng.fill_bytes(&mut bytes),
                None => OsRng
                    .try_fill_bytes(&mut bytes)
                    .expect("the operating system's random source is unavailable"),
            }
            for (word, chunk) in self.block.iter_mut().zip(bytes.chunks_exact(8)) {
                *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            }
            self.used = 0;
        }
        self.used += 1;
        self.block[self.used - 1]
    }

    /// Uniform on {0, …, n − 1}, exactly (rejection, no modulo bias).
    fn below(&mut self, n: u128) -> u128 {
        debug_assert!(n > 0);
        let limit = u128::MAX - (u128::MAX - n + 1) % n;
        loop {
            let r = (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64());
            if r <= limit {
                return r % n;
            }
        }
    }

    /// True with probability num/den.
    fn bernoulli(&mut self, num: u128, den: u128) -> bool {
        self.below(den) < num
    }

    /// True with probability exp(−num/den) (CKS Algorithm 1).
    fn bernoulli_exp(&mut self, num: u128, den: u128) -> bool {
        for _ in 0..num / den {
            if !self.bernoulli_exp_within_one(1, 1) {
                return false;
            }
        }
        self.bernoulli_exp_within_one(num % den, den)
    }

    /// exp(−γ) for γ = num/den ≤ 1: the parity of the first failure of Bernoulli(γ/k).
    fn bernoulli_exp_within_one(&mut self, num: u128, den: u128) -> bool {
        let mut k = 1;
        while self.bernoulli(num, den * k) {
            k += 1;
        }
        k % 2 == 1
    }

    /// Discrete Laplace with P(x) ∝ exp(−|x|·s/t) (CKS Algorithm 2).
    fn discrete_laplace(&mut self, s: u128, t: u128) -> i128 {
        loop {
            let u = self.below(t);
            if !self.bernoulli_exp(u, t) {
                continue;
            }
            let mut v = 0;
            while self.bernoulli_exp(1, 1) {
                v += 1;
            }
            let y = (u + t * v) / s;
            let negative = self.bernoulli(1, 2);
            if negative && y == 0 {
                continue;
            }
            return if negative { -(y as i128) } else { y as i128 };
        }
    }

    /// `value` plus discrete Laplace noise of scale sensitivity/ε: ε-DP for a quantity that
    /// one row moves by at most `sensitivity`.
    pub fn release(&mut self, value: i64, sensitivity: u64, epsilon: Epsilon) -> i64 {
        let noise = self.discrete_laplace(
            u128::from(epsilon.num),
            u128::from(sensitivity) * u128::from(epsilon.den),
        );
        (i128::from(value) + noise).clamp(i64::MIN.into(), i64::MAX.into()) as i64
    }

    /// Integers that one row moves by at most `sensitivity` in L1, together, each with its
    /// noise (the Laplace mechanism); noted in the accounting as `what`.
    pub fn release_all(
        &mut self,
        what: String,
        values: &[i64],
        sensitivity: u64,
        epsilon: Epsilon,
    ) -> Vec<i64> {
        self.record(what, sensitivity, epsilon);
        values
            .iter()
            .map(|&v| self.release(v, sensitivity, epsilon))
            .collect()
    }

    /// A histogram (one row moves it by 2 at most), noised and floored at zero.
    pub fn counts(&mut self, what: String, counts: &[u64], epsilon: Epsilon) -> Vec<u64> {
        let counts: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
        self.release_all(what, &counts, 2, epsilon)
            .into_iter()
            .map(|c| c.max(0) as u64)
            .collect()
    }

    fn record(&mut self, what: String, sensitivity: u64, epsilon: Epsilon) {
        self.spent.push(Spend {
            what,
            epsilon: epsilon.value(),
            sensitivity,
            noise_scale: sensitivity as f64 / epsilon.value(),
        });
    }
}

/// Sub-bins per doubling in the bounds grid: finer bins place bounds closer but need more
/// rows each to clear the threshold.
const GRID_PER_OCTAVE: i32 = 4;
/// Magnitudes from 2⁻³² to 2⁶⁴; smaller ones count as zero, larger as the edge.
const GRID_LOW_EXPONENT: i32 = -32;
const GRID_OCTAVES: i32 = 96;
/// Chance that an empty grid bin, anywhere, passes the threshold. A bin that passes by noise
/// alone widens a bound by orders of magnitude (seen at 10⁻³: a column of 100…1,000 bounded at
/// 1.6·10⁸), so it must be rarer than a job; it costs under twice the rows per bin of 10⁻³.
const BOUNDS_FALSE_POSITIVE: f64 = 1e-6;

const SIDE: i64 = (GRID_OCTAVES * GRID_PER_OCTAVE) as i64;

/// Grid bin of a value: negatives below zero below positives, each side by magnitude.
fn grid_bin(v: f64) -> usize {
    let magnitude = v.abs();
    let step = if magnitude < 2f64.powi(GRID_LOW_EXPONENT) || magnitude.is_nan() {
        None
    } else {
        let e = (magnitude.log2() - GRID_LOW_EXPONENT as f64) * GRID_PER_OCTAVE as f64;
        Some((e.floor() as i64).clamp(0, SIDE - 1))
    };
    match step {
        None => SIDE as usize,
        Some(k) if v < 0.0 => (SIDE - 1 - k) as usize,
        Some(k) => (SIDE + 1 + k) as usize,
    }
}

/// The edges of a grid bin.
fn grid_edges(bin: usize) -> (f64, f64) {
    let edge = |k: i64| 2f64.powf(k as f64 / GRID_PER_OCTAVE as f64 + GRID_LOW_EXPONENT as f64);
    let bin = bin as i64;
    match bin.cmp(&SIDE) {
        std::cmp::Ordering::Equal => (0.0, 0.0),
        std::cmp::Ordering::Less => {
            let k = SIDE - 1 - bin;
            (-edge(k + 1), -edge(k))
        }
        std::cmp::Ordering::Greater => {
            let k = bin - SIDE - 1;
            (edge(k), edge(k + 1))
        }
    }
}

/// Private bounds of a numeric column: the outermost bins of a noisy histogram over the fixed
/// grid whose count clears a threshold no empty bin reaches (but with chance 10⁻⁶). None when
/// no bin does: too few rows for this ε to locate the column.
pub fn bounds(
    column: &str,
    values: &[Option<f64>],
    epsilon: Epsilon,
    noise: &mut Noise,
) -> Option<(f64, f64)> {
    let bins = 2 * SIDE as usize + 1;
    let mut counts = vec![0u64; bins];
    for v in values.iter().flatten() {
        counts[grid_bin(*v)] += 1;
    }
    let noisy = noise.counts(format!("{column}: bounds"), &counts, epsilon);
    let threshold = bounds_threshold(epsilon);
    let first = (0..bins).find(|&b| noisy[b] >= threshold)?;
    let last = (0..bins).rev().find(|&b| noisy[b] >= threshold)?;
    Some((grid_edges(first).0, grid_edges(last).1))
}

/// The noisy count a grid bin needs to count as holding data.
pub fn bounds_threshold(epsilon: Epsilon) -> u64 {
    let bins = (2 * SIDE + 1) as f64;
    (2.0 / epsilon.value() * (bins / BOUNDS_FALSE_POSITIVE).ln()).ceil() as u64
}

/// δ's threshold: the least count t with P(1 + noise ≥ t) ≤ δ, noise of scale 2/ε. A level
/// that one row alone brings in passes it with chance at most δ.
pub fn level_threshold(epsilon: Epsilon, delta: f64) -> u64 {
    let b = 2.0 / epsilon.value();
    // P(noise ≥ k) = exp(−k/b) / (1 + exp(−1/b)) for k ≥ 1.
    let k = b * (1.0 / (delta * (1.0 + (-1.0 / b).exp()))).ln();
    1 + k.ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epsilon_is_split_exactly() {
        let e = Epsilon::at_most(1.0).unwrap();
        let half = e.share(1, 2);
        let tenth = half.share(1, 5);
        let quarter_of_tenth = tenth.share(1, 4);
        let total = (0..5)
            .map(|_| tenth)
            .fold(half, Epsilon::plus)
            .minus(quarter_of_tenth)
            .plus(quarter_of_tenth);
        assert_eq!(total, e);
        assert_eq!(Epsilon::at_most(0.1).unwrap().value(), 104857.0 / 1048576.0);
        assert!(Epsilon::at_most(1e-9).is_none());
    }

    #[test]
    fn discrete_laplace_has_its_distribution() {
        // Scale b = 2/ε = 4: P(0) = tanh(1/(2b)), P(|x| = k) decays by exp(−1/b) per step.
        let mut noise = Noise::from_os();
        let epsilon = Epsilon::at_most(0.5).unwrap();
        let n = 200_000;
        let draws: Vec<i64> = (0..n).map(|_| noise.release(0, 2, epsilon)).collect();
        let share = |k: i64| draws.iter().filter(|&&x| x == k).count() as f64 / n as f64;
        let b: f64 = 4.0;
        let p0 = (1.0 - (-1.0 / b).exp()) / (1.0 + (-1.0 / b).exp());
        for k in [-3, -1, 0, 1, 2, 5] {
            let expected = p0 * (-(k as f64).abs() / b).exp();
            let sigma = (expected / n as f64).sqrt();
            assert!(
                (share(k) - expected).abs() < 6.0 * sigma,
                "P({k}) = {} against {expected}",
                share(k)
            );
        }
        let mean = draws.iter().sum::<i64>() as f64 / n as f64;
        assert!(mean.abs() < 0.1, "{mean}");
    }

    #[test]
    fn noise_is_not_repeated() {
        let epsilon = Epsilon::at_most(0.1).unwrap();
        let draw = || {
            let mut noise = Noise::from_os();
            (0..32)
                .map(|_| noise.release(0, 2, epsilon))
                .collect::<Vec<_>>()
        };
        assert_ne!(draw(), draw());
    }

    #[test]
    fn bounds_cover_the_bulk_and_cut_lone_outliers() {
        let mut values: Vec<Option<f64>> = (0..20_000)
            .map(|i| Some(100.0 + (i % 900) as f64))
            .collect();
        values.push(Some(1e9));
        let mut noise = Noise::from_os();
        let (lo, hi) = bounds("x", &values, Epsilon::at_most(1.0).unwrap(), &mut noise).unwrap();
        assert!((90.0..=100.0).contains(&lo), "{lo}");
        assert!((999.0..=1100.0).contains(&hi), "{hi}");
        let negatives: Vec<Option<f64>> =
            (0..20_000).map(|i| Some(-5.0 - (i % 50) as f64)).collect();
        let (lo, hi) = bounds("y", &negatives, Epsilon::at_most(1.0).unwrap(), &mut noise).unwrap();
        assert!(
            (-64.0..=-54.0).contains(&lo) && (-5.0..=-4.5).contains(&hi),
            "{lo} {hi}"
        );
        // Too few rows for the budget: no bounds rather than noise's.
        let few: Vec<Option<f64>> = (0..100).map(|i| Some(i as f64)).collect();
        assert_eq!(
            bounds("z", &few, Epsilon::at_most(0.05).unwrap(), &mut noise),
            None
        );
        let spent = noise.into_spent();
        assert_eq!(spent.len(), 3);
        assert_eq!(spent[0].what, "x: bounds");
    }

    #[test]
    fn an_empty_bin_clears_the_bounds_threshold_with_chance_under_one_in_a_million() {
        for epsilon in [0.05, 0.25, 1.0, 5.0] {
            let epsilon = Epsilon::at_most(epsilon).unwrap();
            let b = 2.0 / epsilon.value();
            let t = bounds_threshold(epsilon) as f64;
            // Discrete Laplace of scale b: P(noise ≥ t) = exp(−t/b) / (1 + exp(−1/b)).
            let per_bin = (-t / b).exp() / (1.0 + (-1.0 / b).exp());
            let any_bin = per_bin * (2 * SIDE + 1) as f64;
            assert!(any_bin <= 1e-6, "ε = {}: {any_bin}", epsilon.value());
        }
    }

    #[test]
    fn the_level_threshold_meets_delta() {
        let epsilon = Epsilon::at_most(1.0).unwrap();
        let t = level_threshold(epsilon, 1e-6);
        let b: f64 = 2.0;
        let tail = |k: u64| (-(k as f64) / b).exp() / (1.0 + (-1.0 / b).exp());
        assert!(tail(t - 1) <= 1e-6 && tail(t - 2) > 1e-6, "{t}");
    }
}
