//! The packed event record of `EventBatch.data` (format documented in `agent.proto`):
//! the one codec of that format. The agent encodes with [`encode`] and cuts batches
//! on record boundaries with [`Batches`]; the server (and any tool reading raw
//! batches) decodes with [`decode`].
//!
//! Each record, little-endian: `u64` timestamp (ns, `CLOCK_MONOTONIC` scale), `u64` site
//! address, `u32` tid, `u32` argument count `n` (0..=6), then `n` x `u64` arguments.

use crate::Event;

/// Most argument registers a record carries (the SysV integer argument registers).
pub const MAX_ARGS: usize = 6;
/// Bytes of a record before its arguments.
pub const HEADER_LEN: usize = 24;
/// Bytes of the longest record.
pub const MAX_RECORD_LEN: usize = HEADER_LEN + 8 * MAX_ARGS;

/// Why a batch does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event batch truncated in record {index} (needs {need} bytes, {have} left)")]
    Truncated {
        index: u32,
        need: usize,
        have: usize,
    },
    #[error("event record {index} has {nargs} arguments (at most {MAX_ARGS})")]
    TooManyArgs { index: u32, nargs: u32 },
    #[error("event batch has {extra} bytes after its {count} records")]
    TrailingBytes { count: u32, extra: usize },
}

/// Appends one record to `buf`. Arguments beyond [`MAX_ARGS`] are not representable:
/// only the first six are written.
pub fn encode(buf: &mut Vec<u8>, timestamp_ns: u64, address: u64, tid: u32, args: &[u64]) {
    let args = &args[..args.len().min(MAX_ARGS)];
    buf.reserve(HEADER_LEN + 8 * args.len());
    buf.extend_from_slice(&timestamp_ns.to_le_bytes());
    buf.extend_from_slice(&address.to_le_bytes());
    buf.extend_from_slice(&tid.to_le_bytes());
    buf.extend_from_slice(&(args.len() as u32).to_le_bytes());
    for a in args {
        buf.extend_from_slice(&a.to_le_bytes());
    }
}

/// Length in bytes of the record at the start of `data` (`index` only names it in
/// errors).
pub fn record_len(data: &[u8], index: u32) -> Result<usize, DecodeError> {
    if data.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            index,
            need: HEADER_LEN,
            have: data.len(),
        });
    }
    let nargs = u32::from_le_bytes(data[20..24].try_into().expect("4 bytes"));
    if nargs as usize > MAX_ARGS {
        return Err(DecodeError::TooManyArgs { index, nargs });
    }
    let len = HEADER_LEN + 8 * nargs as usize;
    if data.len() < len {
        return Err(DecodeError::Truncated {
            index,
            need: len,
            have: data.len(),
        });
    }
    Ok(len)
}

/// Decodes the `count` records of a batch into events (`function` left empty: the
/// reader names addresses). Every byte must belong to a record.
pub fn decode(data: &[u8], count: u32) -> Result<Vec<Event>, DecodeError> {
    // A hostile count must not make us reserve more than the data can hold.
    let mut out = Vec::with_capacity((count as usize).min(data.len() / HEADER_LEN));
    let mut rest = data;
    for index in 0..count {
        let len = record_len(rest, index)?;
        let u64_at = |o: usize| u64::from_le_bytes(rest[o..o + 8].try_into().expect("8 bytes"));
        let args = (HEADER_LEN..len).step_by(8).map(u64_at).collect();
        out.push(Event {
            timestamp_ns: u64_at(0),
            address: u64_at(8),
            tid: u32::from_le_bytes(rest[16..20].try_into().expect("4 bytes")),
            function: String::new(),
            args,
        });
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            count,
            extra: rest.len(),
        });
    }
    Ok(out)
}

/// Cuts a buffer of `count` well-formed records (as [`encode`] wrote them) into
/// batches of at most `per_batch` records, on record boundaries: yields
/// `(bytes, record_count)`.
pub struct Batches<'a> {
    rest: &'a [u8],
    left: u32,
    per_batch: u32,
}

impl<'a> Batches<'a> {
    /// Batches over `data`, which holds `count` records.
    pub fn new(data: &'a [u8], count: u32, per_batch: u32) -> Self {
        Batches {
            rest: data,
            left: count,
            per_batch: per_batch.max(1),
        }
    }
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<(&'a [u8], u32), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let take = self.left.min(self.per_batch);
        let mut len = 0;
        for index in 0..take {
            match record_len(&self.rest[len..], index) {
                Ok(l) => len += l,
                Err(e) => {
                    self.left = 0;
                    return Some(Err(e));
                }
            }
        }
        let (batch, rest) = self.rest.split_at(len);
        self.rest = rest;
        self.left -= take;
        Some(Ok((batch, take)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (timestamp, address, tid, args)
    type Rec = (u64, u64, u32, Vec<u64>);

    fn sample() -> (Vec<u8>, Vec<Rec>) {
        let records: Vec<Rec> = (0..7u64)
            .map(|i| (1000 + i, 0x40_1000 + i, 7 + i as u32, (0..i % 7).collect()))
            .collect();
        let mut buf = Vec::new();
        for (ts, a, tid, args) in &records {
            encode(&mut buf, *ts, *a, *tid, args);
        }
        (buf, records)
    }

    #[test]
    fn round_trip() {
        let (buf, records) = sample();
        let events = decode(&buf, records.len() as u32).unwrap();
        assert_eq!(events.len(), records.len());
        for (e, (ts, a, tid, args)) in events.iter().zip(&records) {
            assert_eq!((e.timestamp_ns, e.address, e.tid), (*ts, *a, *tid));
            assert_eq!(&e.args, args);
        }
    }

    #[test]
    fn layout_is_the_documented_one() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, 2, 3, &[4, 5]);
        let mut want = Vec::new();
        for w in [1u64, 2] {
            want.extend_from_slice(&w.to_le_bytes());
        }
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        for w in [4u64, 5] {
            want.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(buf, want);
    }

    #[test]
    fn seven_args_are_cut_to_six() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, 2, 3, &[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(buf.len(), MAX_RECORD_LEN);
        assert_eq!(decode(&buf, 1).unwrap()[0].args, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn bad_batches_are_refused_precisely() {
        let (buf, records) = sample();
        let n = records.len() as u32;
        assert!(matches!(
            decode(&buf[..buf.len() - 1], n),
            Err(DecodeError::Truncated { index: 6, .. })
        ));
        assert_eq!(
            decode(&buf, n - 1),
            Err(DecodeError::TrailingBytes {
                count: n - 1,
                extra: HEADER_LEN + 8 * 6
            })
        );
        let mut bad = buf.clone();
        bad[20..24].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            decode(&bad, n),
            Err(DecodeError::TooManyArgs { index: 0, nargs: 7 })
        );
        // A made-up huge count fails without reserving for it.
        assert!(decode(&buf, u32::MAX).is_err());
        assert_eq!(decode(&[], 0), Ok(vec![]));
    }

    #[test]
    fn batches_cut_on_record_boundaries() {
        let (buf, records) = sample();
        let n = records.len() as u32;
        for per in 1..=8 {
            let mut all = Vec::new();
            let mut counts = Vec::new();
            for b in Batches::new(&buf, n, per) {
                let (bytes, c) = b.unwrap();
                assert!(c <= per);
                counts.push(c);
                all.extend(decode(bytes, c).unwrap());
            }
            assert_eq!(counts.iter().sum::<u32>(), n);
            assert_eq!(all, decode(&buf, n).unwrap());
        }
    }
}
