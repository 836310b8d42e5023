//! Deterministic randomness: every random choice is seeded from the job
//! seed and the tensor's name, so a tensor encodes the same way wherever
//! and however often it is encoded.

/// SplitMix64: small, fast, and good enough for signs, starts and sketches.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// Starts from a seed.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn gaussian(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// The seed of one random choice: the job seed, the tensor name and a salt
/// naming the use (e.g. `"hadamard"`), mixed with FNV-1a and SplitMix64.
pub fn seed_for(job_seed: u64, tensor: &str, salt: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tensor.bytes().chain([0u8]).chain(salt.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    SplitMix64::new(h ^ job_seed.rotate_left(17)).next_u64()
}

/// `n` standard-normal f32 values from a seed (for tests and benches).
pub fn gaussian_vec(seed: u64, n: usize) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| r.gaussian() as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_depend_on_every_input() {
        let a = seed_for(1, "w", "x");
        assert_ne!(a, seed_for(2, "w", "x"));
        assert_ne!(a, seed_for(1, "v", "x"));
        assert_ne!(a, seed_for(1, "w", "y"));
        assert_eq!(a, seed_for(1, "w", "x"));
    }

    #[test]
    fn gaussian_has_unit_variance() {
        let v = gaussian_vec(3, 200_000);
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }
}
