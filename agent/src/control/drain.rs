//! Draining the per-thread event rings (the consumer side of `hot::ring`, agent thread
//! only), and the clock that turns the events' TSC readings into CLOCK_MONOTONIC time.
//!
//! Record (little-endian): u64 tsc, u64 site, u64 tracer, u32 tid, u32 nargs,
//! 6 x u64 args.

use std::sync::atomic::Ordering;

use crate::hot::block::{EVENT_BYTES, Header, RING_SLOTS};
use crate::hot::ring::rdtsc;

/// One decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub tsc: u64,
    pub site: u64,
    pub tracer: u64,
    pub tid: u32,
    pub nargs: u32,
    pub args: [u64; 6],
}

/// Takes every event currently in the ring (agent thread only; the tests' drain).
#[cfg(test)]
pub fn drain(h: &Header, mut f: impl FnMut(Record)) -> usize {
    drain_while(h, |r| {
        f(*r);
        true
    })
}

/// Takes the events currently in the ring, oldest first, while `f` accepts them
/// (agent thread only): the first record `f` refuses stays in the ring with every
/// later one. Returns how many were taken.
pub fn drain_while(h: &Header, mut f: impl FnMut(&Record) -> bool) -> usize {
    let tail = h.ring_tail.load(Ordering::Relaxed);
    let head = h.ring_head.load(Ordering::Acquire);
    let mut n = 0;
    let mut pos = tail;
    while pos != head {
        let slot = (pos % RING_SLOTS as u64) as usize;
        // SAFETY: slots in [tail, head) were published by the producer's release store.
        let r = unsafe {
            let p = h.ring().add(slot * EVENT_BYTES).cast::<u64>();
            let tid_n = p.add(3).read();
            let nargs = ((tid_n >> 32) as u32).min(6);
            let mut args = [0u64; 6];
            for (i, a) in args.iter_mut().enumerate().take(nargs as usize) {
                *a = p.add(4 + i).read();
            }
            Record {
                tsc: p.read(),
                site: p.add(1).read(),
                tracer: p.add(2).read(),
                tid: tid_n as u32,
                nargs,
                args,
            }
        };
        if !f(&r) {
            break;
        }
        pos = pos.wrapping_add(1);
        n += 1;
    }
    h.ring_tail.store(pos, Ordering::Release);
    n
}

/// Converts TSC readings to CLOCK_MONOTONIC nanoseconds (calibrated at start and
/// refined on every call to [`Clock::recalibrate`]).
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    tsc0: u64,
    ns0: u64,
    ns_per_tick: f64,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            tsc0: rdtsc(),
            ns0: monotonic_ns(),
            ns_per_tick: 0.0,
        }
    }

    /// Updates the scale from the time elapsed since creation.
    pub fn recalibrate(&mut self) {
        let (t, n) = (rdtsc(), monotonic_ns());
        let dt = t.wrapping_sub(self.tsc0);
        if dt > 1_000_000 && n > self.ns0 {
            self.ns_per_tick = (n - self.ns0) as f64 / dt as f64;
        }
    }

    /// Nanoseconds per TSC tick (1.0 until calibrated).
    pub fn ns_per_tick(self) -> f64 {
        if self.ns_per_tick > 0.0 {
            self.ns_per_tick
        } else {
            1.0
        }
    }

    /// A duration of `ticks` TSC ticks, in nanoseconds.
    pub fn duration_ns(self, ticks: u64) -> u64 {
        (ticks as f64 * self.ns_per_tick()) as u64
    }

    pub fn to_ns(self, tsc: u64) -> u64 {
        let scale = if self.ns_per_tick > 0.0 {
            self.ns_per_tick
        } else {
            1.0
        };
        let d = tsc as i128 - self.tsc0 as i128;
        (self.ns0 as i128 + (d as f64 * scale) as i128).max(0) as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hot::block;
    use crate::hot::ring::push;

    #[test]
    fn push_drain_and_drop_when_full() {
        block::refill(2).unwrap();
        std::thread::spawn(|| {
            let h = block::claim(77).unwrap();
            assert!(push(h, 9, 0x1000, 77, &[1, 2, 0, 0, 0, 0], 2));
            let mut got = Vec::new();
            assert_eq!(drain(h, |r| got.push(r)), 1);
            assert_eq!(got[0].site, 0x1000);
            assert_eq!(got[0].tracer, 9);
            assert_eq!(&got[0].args[..2], &[1, 2]);
            assert!(push(h, 9, 0x2000, 77, &[0; 6], 0));
            for _ in 1..RING_SLOTS {
                assert!(push(h, 9, 0x1000, 77, &[0; 6], 0));
            }
            assert!(!push(h, 9, 0x1000, 77, &[0; 6], 0), "full ring drops");
            assert_eq!(
                drain_while(h, |r| r.site != 0x2000),
                0,
                "refused: left in the ring"
            );
            assert_eq!(drain(h, |_| {}), RING_SLOTS);
            h.release(std::iter::empty());
        })
        .join()
        .unwrap();
    }
}
