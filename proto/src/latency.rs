//! The latency histogram's buckets: one definition shared by the agent (which counts a
//! call's duration in TSC cycles into a bucket of the thread's block), the server (which
//! merges histograms bucket by bucket) and the tools (which turn buckets into
//! percentiles and ASCII histograms).
//!
//! Buckets are log-linear over cycles: 0 and 1 have their own bucket, then every power
//! of two is split in [`SUB`] equal parts, up to `2^MAX_EXP` cycles (about 23 s at
//! 3 GHz); longer calls fall in the last bucket (their exact maximum is kept apart).
//! A bucket's relative width is at most 1/[`SUB`] of its lower bound.
//!
//! Everything here is pure and allocation-free (`bucket_of` runs in the agent's return
//! path on program threads: async-signal-safe).

/// Sub-buckets per power of two.
pub const SUB: u64 = 2;
const SUB_BITS: u32 = 1;
/// Highest power of two with its own buckets.
pub const MAX_EXP: u32 = 35;
/// Number of buckets.
pub const BUCKETS: usize = 2 + (MAX_EXP as usize) * SUB as usize;

/// The bucket of a duration of `cycles`. Async-signal-safe.
#[inline(always)]
pub const fn bucket_of(cycles: u64) -> usize {
    if cycles < 2 {
        return cycles as usize;
    }
    let e = 63 - cycles.leading_zeros(); // >= 1
    if e > MAX_EXP {
        return BUCKETS - 1;
    }
    // The SUB_BITS bits below the leading one.
    let sub = (cycles >> (e - SUB_BITS)) & (SUB - 1);
    2 + ((e - 1) as usize) * SUB as usize + sub as usize
}

/// The lower bound (inclusive) of bucket `b`, in cycles.
pub const fn bucket_low(b: usize) -> u64 {
    if b < 2 {
        return b as u64;
    }
    let k = b - 2;
    let e = (k / SUB as usize) as u32 + 1;
    let sub = (k % SUB as usize) as u64;
    (1u64 << e) + sub * ((1u64 << e) / SUB)
}

/// The upper bound (exclusive) of bucket `b`, in cycles (`u64::MAX` for the last).
pub const fn bucket_high(b: usize) -> u64 {
    if b + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_low(b + 1)
    }
}

/// The value at quantile `q` (0..=1) of a histogram (`counts[b]` calls in bucket `b`),
/// as the midpoint of the bucket that holds it, clamped to `[min, max]` (the exact
/// extremes, in the same unit as the result of `to_unit`). None when it is empty.
pub fn quantile(
    counts: &[u64],
    q: f64,
    min: u64,
    max: u64,
    to_unit: impl Fn(u64) -> u64,
) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the call at quantile q (1-based), as in "nearest rank".
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0u64;
    for (b, &c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            let lo = to_unit(bucket_low(b));
            let hi = if b + 1 >= BUCKETS {
                max
            } else {
                to_unit(bucket_high(b))
            };
            let mid = lo + (hi.saturating_sub(lo)) / 2;
            return Some(mid.clamp(min, max.max(min)));
        }
    }
    Some(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order_and_bounds_agree() {
        assert_eq!(BUCKETS, 72);
        let mut last = 0;
        for v in (0..5000u64).chain([1 << 20, (1 << 35) + 1, 1 << 36, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b < BUCKETS, "{v}");
            assert!(b >= last || v >= 1 << 20, "monotonic at {v}");
            last = b;
            assert!(bucket_low(b) <= v, "{v} >= low of {b}");
            assert!(v < bucket_high(b) || b == BUCKETS - 1, "{v} < high of {b}");
        }
        for b in 0..BUCKETS - 1 {
            assert_eq!(bucket_of(bucket_low(b)), b, "low bound of {b}");
            assert_eq!(bucket_of(bucket_high(b) - 1), b, "high bound of {b}");
        }
        // Relative width <= 1/SUB.
        for b in 2..BUCKETS - 1 {
            let (lo, hi) = (bucket_low(b), bucket_high(b));
            assert!((hi - lo) * SUB <= lo, "bucket {b}: {lo}..{hi}");
        }
    }

    #[test]
    fn quantiles_fall_in_the_right_bucket_and_within_the_extremes() {
        let mut h = vec![0u64; BUCKETS];
        // 90 calls of 100 cycles, 10 of 10_000.
        h[bucket_of(100)] += 90;
        h[bucket_of(10_000)] += 10;
        let id = |c| c;
        let p50 = quantile(&h, 0.5, 100, 10_000, id).unwrap();
        assert_eq!(bucket_of(p50), bucket_of(100));
        let p90 = quantile(&h, 0.9, 100, 10_000, id).unwrap();
        assert_eq!(
            bucket_of(p90),
            bucket_of(100),
            "the 90th call is still short"
        );
        let p99 = quantile(&h, 0.99, 100, 10_000, id).unwrap();
        assert_eq!(bucket_of(p99), bucket_of(10_000));
        assert!(p99 <= 10_000);
        assert_eq!(quantile(&[0; BUCKETS], 0.5, 0, 0, id), None);
    }
}
