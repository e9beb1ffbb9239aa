//! Helpers for the workspace's fuzz targets (bolero `check!` harnesses that run for a
//! second under `cargo test` after replaying their committed corpora, and coverage-guided
//! under libFuzzer with `ops/scripts/fuzz-corpus.sh`).

/// `seed` changed by `ops`, so that fuzz inputs reach past the first parser check: each 3
/// bytes overwrite one byte (position from the first two, value from the third); a
/// trailing single byte truncates to that fraction of 256.
pub fn mutate(seed: &[u8], ops: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    let mut chunks = ops.chunks_exact(3);
    for c in &mut chunks {
        if out.is_empty() {
            break;
        }
        let pos = usize::from(u16::from_be_bytes([c[0], c[1]])) % out.len();
        out[pos] = c[2];
    }
    if let [cut] = chunks.remainder() {
        out.truncate(usize::from(*cut) * out.len() / 256);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::mutate;

    #[test]
    fn mutations_overwrite_and_truncate() {
        let seed = b"abcdef";
        assert_eq!(mutate(seed, &[]), seed);
        assert_eq!(mutate(seed, &[0, 1, b'X']), b"aXcdef");
        assert_eq!(mutate(seed, &[128]), b"abc");
        assert!(mutate(&[], &[0, 0, 1, 7]).is_empty());
    }
}
