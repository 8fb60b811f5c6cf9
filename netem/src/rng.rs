//! The model's only source of randomness: a seeded xoshiro256++ generator, netem's correlated
//! uniform (`get_crandom`) and the inverse normal CDF used to draw from delay distributions.
//!
//! Our own generator rather than `rand`, so a seed replays the same run whatever `rand` version
//! a dependency pulls in. Nothing here reads the clock or the environment.

/// xoshiro256++ seeded through splitmix64 (the seeding its authors recommend).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut s = [0; 4];
        for word in &mut s {
            *word = splitmix64(&mut x);
        }
        Self { s }
    }

    /// A generator for one named purpose, independent of the other streams of the same seed.
    pub fn derived(seed: u64, salt: u64) -> Self {
        let mut x = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self::new(splitmix64(&mut x))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = (self.s[0].wrapping_add(self.s[3]))
            .rotate_left(23)
            .wrapping_add(self.s[0]);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n); `n` must be non-zero.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in [lo, hi].
    pub fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// netem's correlated uniform (`get_crandom` in `sch_netem.c`): each draw is a weighted mean of
/// a fresh uniform and the previous draw, `u' = (1 - rho) * u + rho * last`.
///
/// Kept as netem does it, flaws included (the spread shrinks as rho grows), so that a profile
/// with a correlation means the same thing here and under `tc`.
#[derive(Debug, Clone, Default)]
pub struct Correlated {
    rho: f64,
    last: f64,
}

impl Correlated {
    pub fn new(rho: f64) -> Self {
        Self { rho, last: 0.0 }
    }

    pub fn next(&mut self, rng: &mut Rng) -> f64 {
        let value = rng.unit();
        if self.rho == 0.0 {
            return value;
        }
        let answer = value * (1.0 - self.rho) + self.last * self.rho;
        self.last = answer;
        answer
    }
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, relative error below
/// 1.2e-9): maps a uniform in (0, 1) to a standard normal variate, which is what netem's
/// `normal` table does with a table lookup.
pub fn inverse_normal_cdf(p: f64) -> f64 {
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
    const LOW: f64 = 0.02425;
    // netem's table spans about +-4 sigma; clamp the tails the same way.
    let p = p.clamp(3.2e-5, 1.0 - 3.2e-5);
    if p < LOW {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    }
}

/// The variate behind iproute2's `pareto` table (`netem/pareto.c`): Pareto with shape 3, shifted
/// to mean 0 and scaled by 4/3, capped where the table's 16-bit entries saturate.
pub fn pareto_variate(u: f64) -> f64 {
    const CAP: f64 = 32767.0 / 8192.0;
    let u = u.max(1e-12);
    ((4.0 / 3.0) * (u.powf(-1.0 / 3.0) - 1.5)).min(CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut c = Rng::new(8);
        let xs: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..16).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn unit_is_uniform() {
        let mut rng = Rng::new(1);
        let n = 100_000;
        let mean = (0..n).map(|_| rng.unit()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
    }

    #[test]
    fn inverse_normal_is_standard() {
        let mut rng = Rng::new(2);
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|_| inverse_normal_cdf(rng.unit())).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var.sqrt() - 1.0).abs() < 0.02, "{var}");
        assert!((inverse_normal_cdf(0.975) - 1.959_964).abs() < 1e-5);
    }
}
