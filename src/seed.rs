//! Seeds and hashes: every random draw in the project comes from a seed derived here, keyed by
//! what it is for, so that a run resumed at step N replays exactly the draws an uninterrupted
//! run makes, and a completion does not depend on what else is in its batch.

/// What a derived seed is for (see [`derive_seed`]): one key per kind of random draw.
pub const SEED_DATA: u64 = 1;
pub const SEED_SUBSET: u64 = 2;
pub const SEED_DROPOUT: u64 = 3;
pub const SEED_LORA_INIT: u64 = 4;
pub const SEED_SAMPLING: u64 = 5;
pub const SEED_RANKER: u64 = 6;
pub const SEED_CODEBOOK: u64 = 7;
pub const SEED_NEW_TOKENS: u64 = 8;

/// A mixing step of SplitMix64: a well-spread 64-bit hash of `x`.
#[inline]
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A seed derived from (seed, a, b), e.g. (run seed, [`SEED_DROPOUT`], step): independent
/// streams for independent purposes, each a pure function of its key.
pub fn derive_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut x = splitmix64(seed ^ 0x005E_ED0F_7EA1);
    x = splitmix64(x ^ a);
    splitmix64(x ^ b)
}

/// 64-bit FNV-1a of `bytes`: a stable hash of names and texts (layer paths, configs).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// [`fnv1a`] of a text, as 16 hex digits (the config hash a checkpoint records).
pub fn fnv_hex(text: &str) -> String {
    format!("{:016x}", fnv1a(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // FNV-1a's published test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv_hex("a"), "af63dc4c8601ec8c");
        // SplitMix64 from state 0: the generator's first output is splitmix64(0).
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_ne!(derive_seed(0, SEED_DATA, 0), derive_seed(0, SEED_SUBSET, 0));
        assert_eq!(derive_seed(7, 3, 9), derive_seed(7, 3, 9));
        assert_ne!(derive_seed(1, 2, 3), derive_seed(1, 3, 2));
        assert_ne!(derive_seed(1, 2, 3), derive_seed(2, 2, 3));
    }
}
