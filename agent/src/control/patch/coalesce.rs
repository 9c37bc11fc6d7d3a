//! Coalescing the code writes of one patching step into few `pwrite`s. Pure.
//!
//! One step of the int3 protocol writes a few bytes at every site of a batch (the
//! `0xCC`, then the tails, then the first bytes). Written one by one, that is one
//! system call per site and step (≈1.4 µs each on the reference VM: 42 ms for 10,000
//! sites). Sites of one object sit close together, so a step instead writes *spans*:
//! the bytes from the first to the last write of a group, where the bytes between
//! writes are the ones currently in memory, re-read just before. Re-writing a code byte
//! with the value it already has is invisible to a thread executing it (each byte is
//! stored once, with its own value: no intermediate value exists), so a span write
//! changes exactly the bytes the writes name.
//!
//! That argument needs the bytes between writes to be stable while the span is read
//! and written: nothing but the patcher (which holds its lock) may write them. So a
//! span lies entirely inside one mapping that is readable and *not writable* (taken from
//! `/proc/self/maps` just before), and never spans a gap wider than [`MAX_GAP`]. A
//! write outside such a mapping stays a write of its own.

use crate::sys::procfs::Mapping;

/// One write of a step: `bytes` at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write<'a> {
    pub addr: usize,
    pub bytes: &'a [u8],
}

impl Write<'_> {
    fn end(&self) -> usize {
        self.addr + self.bytes.len()
    }
}

/// Writes `writes[first..last]` (sorted by address) as one write of `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub first: usize,
    pub last: usize,
}

/// Widest run of unchanged bytes between two writes of one span.
pub const MAX_GAP: usize = 4096;
/// Longest span.
pub const MAX_SPAN: usize = 64 * 1024;

/// Readable, non-writable mappings `[start, end)` of `/proc/self/maps`, sorted.
pub(crate) fn readonly_mappings(maps: &[Mapping]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = maps
        .iter()
        .filter(|m| m.read_only() && m.start < m.end)
        .map(|m| (m.start as usize, m.end as usize))
        .collect();
    out.sort_unstable();
    out
}

/// The mapping of `ro` (sorted, disjoint) that contains `[a, b)`, if any.
fn mapping_of(ro: &[(usize, usize)], a: usize, b: usize) -> Option<(usize, usize)> {
    let i = ro.partition_point(|&(s, _)| s <= a);
    let &(s, e) = ro.get(i.checked_sub(1)?)?;
    (a >= s && b <= e).then_some((s, e))
}

/// Sorts `writes` by address and groups them into spans (see the module doc).
/// Overlapping writes are never merged (each keeps its own span, in address order).
pub fn spans(writes: &mut [Write<'_>], ro: &[(usize, usize)]) -> Vec<Span> {
    writes.sort_by_key(|w| w.addr);
    let mut out: Vec<Span> = Vec::new();
    let mut cur: Option<(Span, Option<(usize, usize)>)> = None;
    for (i, w) in writes.iter().enumerate() {
        let map = mapping_of(ro, w.addr, w.end());
        if let Some((span, Some(m))) = cur.as_mut() {
            let joins = map == Some(*m)
                && w.addr >= span.end
                && w.addr - span.end <= MAX_GAP
                && w.end() - span.start <= MAX_SPAN;
            if joins {
                span.end = w.end();
                span.last = i + 1;
                continue;
            }
        }
        if let Some((span, _)) = cur.take() {
            out.push(span);
        }
        cur = Some((
            Span {
                start: w.addr,
                end: w.end(),
                first: i,
                last: i + 1,
            },
            map,
        ));
    }
    if let Some((span, _)) = cur {
        out.push(span);
    }
    out
}

/// The bytes of `span`: `current` (the memory of `[span.start, span.end)` as read just
/// before) with the span's writes applied.
pub fn span_bytes(span: &Span, writes: &[Write<'_>], current: &[u8]) -> Vec<u8> {
    debug_assert_eq!(current.len(), span.end - span.start);
    let mut buf = current.to_vec();
    for w in &writes[span.first..span.last] {
        let o = w.addr - span.start;
        buf[o..o + w.bytes.len()].copy_from_slice(w.bytes);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::procfs::parse_maps;
    use proptest::prelude::*;

    const MAPS: &str = "\
555555554000-555555556000 r--p 00000000 fd:01 1 /bin/t
555555556000-55555555a000 r-xp 00002000 fd:01 1 /bin/t
55555555a000-55555555b000 rw-p 00006000 fd:01 1 /bin/t
7ffff7fc0000-7ffff7fc1000 ---p 00000000 00:00 0
7ffff7fc1000-7ffff7fc9000 rwxp 00000000 00:00 0
7ffff7fd0000-7ffff7ff0000 r-xp 00001000 fd:01 2 /lib/ld.so
";

    #[test]
    fn readonly_mappings_keep_readable_non_writable_ones() {
        assert_eq!(
            readonly_mappings(&parse_maps(MAPS)),
            vec![
                (0x555555554000, 0x555555556000),
                (0x555555556000, 0x55555555a000),
                (0x7ffff7fd0000, 0x7ffff7ff0000),
            ]
        );
    }

    #[test]
    fn close_sites_of_one_mapping_form_one_span() {
        let ro = readonly_mappings(&parse_maps(MAPS));
        let cc = [0xCC];
        let mut w = vec![
            Write {
                addr: 0x555555556040,
                bytes: &cc,
            },
            Write {
                addr: 0x555555556010,
                bytes: &cc,
            },
            Write {
                addr: 0x555555556020,
                bytes: &cc,
            },
        ];
        let s = spans(&mut w, &ro);
        assert_eq!(
            s,
            vec![Span {
                start: 0x555555556010,
                end: 0x555555556041,
                first: 0,
                last: 3
            }]
        );
        let cur = vec![0x90u8; 0x31];
        let b = span_bytes(&s[0], &w, &cur);
        assert_eq!(b[0], 0xCC);
        assert_eq!(b[0x10], 0xCC);
        assert_eq!(b[0x30], 0xCC);
        assert_eq!(b.iter().filter(|&&x| x == 0xCC).count(), 3);
    }

    #[test]
    fn writable_or_unknown_memory_and_mapping_borders_are_never_spanned() {
        let ro = readonly_mappings(&parse_maps(MAPS));
        let t = [1, 2, 3, 4];
        let mut w = vec![
            // last bytes of the r-- mapping and first of the r-x one: two mappings.
            Write {
                addr: 0x555555555ffa,
                bytes: &t,
            },
            Write {
                addr: 0x555555556000,
                bytes: &t,
            },
            // writable mapping: alone, each.
            Write {
                addr: 0x55555555a000,
                bytes: &t,
            },
            Write {
                addr: 0x55555555a008,
                bytes: &t,
            },
            // rwx: alone too.
            Write {
                addr: 0x7ffff7fc1000,
                bytes: &t,
            },
            Write {
                addr: 0x7ffff7fc1010,
                bytes: &t,
            },
            // straddles the end of a mapping: alone.
            Write {
                addr: 0x7ffff7feffff,
                bytes: &t,
            },
        ];
        let s = spans(&mut w, &ro);
        assert_eq!(s.len(), 7, "{s:x?}");
        assert!(s.iter().all(|s| s.last - s.first == 1));
    }

    #[test]
    fn wide_gaps_and_overlaps_split() {
        let ro = vec![(0x1000, 0x100000)];
        let t = [1, 2, 3, 4, 5];
        let mut w = vec![
            Write {
                addr: 0x2000,
                bytes: &t,
            },
            Write {
                addr: 0x2000 + 5 + MAX_GAP,
                bytes: &t,
            }, // gap == MAX_GAP: joins
            Write {
                addr: 0x2000 + 10 + 2 * MAX_GAP + 1,
                bytes: &t,
            }, // gap > MAX_GAP
            Write {
                addr: 0x2000 + 12 + 2 * MAX_GAP + 1,
                bytes: &t,
            }, // overlaps
        ];
        let s = spans(&mut w, &ro);
        assert_eq!(
            s.iter().map(|s| s.last - s.first).collect::<Vec<_>>(),
            vec![2, 1, 1]
        );
    }

    proptest! {
        /// Every write lands in exactly one span, spans are disjoint and in order, a
        /// multi-write span lies in one read-only mapping, and the span bytes differ
        /// from memory exactly where writes are.
        #[test]
        fn spans_cover_writes_exactly(
            offsets in proptest::collection::btree_set(0usize..40_000, 1..200),
            len in 1usize..7,
        ) {
            let ro = vec![(0x10000, 0x10000 + 20_000), (0x10000 + 20_000, 0x10000 + 30_000)];
            let bytes = vec![0xCCu8; len];
            // Keep writes disjoint (sites are at least 5 bytes apart in real code).
            let mut addrs: Vec<usize> = Vec::new();
            for o in offsets {
                let a = 0x10000 + o;
                if addrs.last().is_none_or(|&p| a >= p + len) {
                    addrs.push(a);
                }
            }
            let mut w: Vec<Write> = addrs.iter().map(|&a| Write { addr: a, bytes: &bytes }).collect();
            let s = spans(&mut w, &ro);
            let mut next = 0;
            for (k, sp) in s.iter().enumerate() {
                prop_assert_eq!(sp.first, next);
                prop_assert!(sp.last > sp.first);
                next = sp.last;
                prop_assert_eq!(sp.start, w[sp.first].addr);
                prop_assert_eq!(sp.end, w[sp.last - 1].addr + len);
                prop_assert!(sp.end - sp.start <= MAX_SPAN.max(len));
                if k > 0 {
                    prop_assert!(s[k - 1].end <= sp.start);
                }
                if sp.last - sp.first > 1 {
                    prop_assert!(mapping_of(&ro, sp.start, sp.end).is_some());
                }
                let cur = vec![0u8; sp.end - sp.start];
                let b = span_bytes(sp, &w, &cur);
                let changed = b.iter().filter(|&&x| x == 0xCC).count();
                prop_assert_eq!(changed, (sp.last - sp.first) * len);
            }
            prop_assert_eq!(next, w.len());
        }
    }
}
