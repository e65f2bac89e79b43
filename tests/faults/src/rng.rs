//! The suite's seeded random generator and its knobs.
//!
//! Every choice a fault test makes (which point to kill at, how long to wait, which file and
//! byte to damage) comes from a [`Rng`] seeded by one `u64`, so a failure is reproduced by
//! running the same test with the seed it printed. The generator is SplitMix64 (Steele, Lea
//! and Flood, 2014): a handful of arithmetic lines whose output is fixed by the seed alone, on
//! every platform and whatever crate versions the workspace resolves to (a library generator
//! could change its stream between releases, and old seeds would stop reproducing).
//!
//! Knobs (environment):
//! - `KILN_FAULTS_SEED=N` runs that one seed; unset, the fixed [`CI_SEEDS`] run.
//! - `KILN_FAULTS_ROUNDS=M` rounds per seed (default 1): each round draws new points.

/// The seeds CI runs when `KILN_FAULTS_SEED` is unset.
pub const CI_SEEDS: &[u64] = &[1, 2];

/// A SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0). The modulo bias is below 2^-40 for the sizes used here.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next_u64() % n
    }

    /// A value in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "between({lo}, {hi})");
        lo + self.below(hi - lo + 1)
    }

    /// One element of `items` (non-empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A fair coin.
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// The seeds to run: `KILN_FAULTS_SEED` if set, else [`CI_SEEDS`].
pub fn seeds() -> Vec<u64> {
    match std::env::var("KILN_FAULTS_SEED") {
        Ok(s) if !s.trim().is_empty() => vec![
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("KILN_FAULTS_SEED={s:?} is not a u64")),
        ],
        _ => CI_SEEDS.to_vec(),
    }
}

/// Rounds per seed: `KILN_FAULTS_ROUNDS`, default 1.
pub fn rounds() -> u32 {
    match std::env::var("KILN_FAULTS_ROUNDS") {
        Ok(s) if !s.trim().is_empty() => {
            let n: u32 = s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("KILN_FAULTS_ROUNDS={s:?} is not a count"));
            assert!(n > 0, "KILN_FAULTS_ROUNDS must be at least 1");
            n
        }
        _ => 1,
    }
}

/// The generator of one round of one test: derived from the seed, the round and the test's
/// name, so that two tests given one seed draw different points and a round can be replayed
/// on its own.
pub fn round_rng(test: &str, seed: u64, round: u32) -> Rng {
    // FNV-1a of the name, mixed with the seed and round through one SplitMix64 step.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in test.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut mix = Rng::new(h ^ seed.rotate_left(17) ^ u64::from(round).rotate_left(43));
    Rng::new(mix.next_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_same_seed_same_stream_other_seed_other_stream() {
        let a: Vec<u64> = (0..8)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..8)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let c: Vec<u64> = (0..8)
            .scan(Rng::new(8), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn rng_stream_is_pinned() {
        // SplitMix64's published first output for seed 0: a changed generator would make
        // every seed printed by an earlier failure reproduce something else.
        assert_eq!(Rng::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn rng_bounds_hold() {
        let mut r = Rng::new(3);
        for _ in 0..10_000 {
            assert!(r.below(5) < 5);
            let v = r.between(10, 12);
            assert!((10..=12).contains(&v));
        }
        let items = [1, 2, 3];
        let mut seen = [false; 3];
        for _ in 0..100 {
            seen[*r.pick(&items) as usize - 1] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn round_rng_differs_by_test_seed_and_round() {
        let first = |t: &str, s, r| round_rng(t, s, r).next_u64();
        assert_eq!(first("a", 1, 0), first("a", 1, 0));
        assert_ne!(first("a", 1, 0), first("b", 1, 0));
        assert_ne!(first("a", 1, 0), first("a", 2, 0));
        assert_ne!(first("a", 1, 0), first("a", 1, 1));
    }
}
