//! SIGINT and SIGTERM sent to `patchbay run`: caught (so that `patchbay` lives on to print
//! the final table) and reported with whether the terminal sent them.
//!
//! A terminal's Ctrl-C goes to the whole foreground process group, the program included,
//! so it must not be forwarded a second time (a program that exits gracefully on the first
//! Ctrl-C and forcefully on the second would see two). A signal sent to `patchbay` alone
//! (`kill PID`) is forwarded. The kernel marks terminal-generated signals with
//! `si_code == SI_KERNEL`, which only an `SA_SIGINFO` handler sees: it writes one byte per
//! signal into a socket pair that the runtime reads.

use std::io;
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use tokio::io::AsyncReadExt;

/// The write end of the socket pair (-1 before [`Signals::install`]).
static WRITER: AtomicI32 = AtomicI32::new(-1);

const FROM_TERMINAL: u8 = 0x80;

/// One signal received by this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub signal: Signal,
    /// Sent by the terminal driver (Ctrl-C) to the whole foreground process group.
    pub from_terminal: bool,
}

fn encode(signal: libc::c_int, from_terminal: bool) -> u8 {
    (signal as u8 & !FROM_TERMINAL) | if from_terminal { FROM_TERMINAL } else { 0 }
}

fn decode(byte: u8) -> Option<Received> {
    let signal = Signal::try_from(i32::from(byte & !FROM_TERMINAL)).ok()?;
    Some(Received {
        signal,
        from_terminal: byte & FROM_TERMINAL != 0,
    })
}

extern "C" fn on_signal(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: read siginfo, write(2) one byte.
    let code = if info.is_null() {
        0
    } else {
        // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
        unsafe { (*info).si_code }
    };
    let byte = encode(signal, code == libc::SI_KERNEL);
    let fd = WRITER.load(Ordering::Relaxed);
    if fd >= 0 {
        let saved = Errno::last_raw();
        // SAFETY: writing one byte from a live local to a descriptor this module owns for
        // the life of the process. A full (non-blocking) socket drops the byte, harmlessly.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
        Errno::set_raw(saved);
    }
}

/// The signals caught since [`Signals::install`].
pub struct Signals {
    reader: tokio::net::UnixStream,
}

impl Signals {
    /// Catches `signals` for the rest of the life of the process. Call once, inside the
    /// runtime. The handlers are reset to the default in programs this process executes.
    pub fn install(signals: &[Signal]) -> io::Result<Signals> {
        let (reader, writer) = std::os::unix::net::UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let reader = tokio::net::UnixStream::from_std(reader)?;
        // The write end lives as long as the process (the handlers may run at any time).
        let old = WRITER.swap(writer.into_raw_fd(), Ordering::AcqRel);
        if old >= 0 {
            // SAFETY: the previous write end is ours; no handler uses it any more.
            unsafe { libc::close(old) };
        }
        let action = SigAction::new(
            SigHandler::SigAction(on_signal),
            SaFlags::SA_RESTART | SaFlags::SA_SIGINFO,
            SigSet::empty(),
        );
        for signal in signals {
            // SAFETY: the handler only reads its arguments and calls write(2).
            unsafe { sigaction(*signal, &action) }.map_err(io::Error::from)?;
        }
        Ok(Signals { reader })
    }

    /// A signal received already, if any.
    pub fn try_recv(&mut self) -> Option<Received> {
        let mut byte = [0u8; 1];
        loop {
            match self.reader.try_read(&mut byte) {
                Ok(1) => {
                    if let Some(received) = decode(byte[0]) {
                        return Some(received);
                    }
                }
                _ => return None,
            }
        }
    }

    /// The next signal. Cancel-safe. Pends forever if the socket fails (which it does not).
    pub async fn recv(&mut self) -> Received {
        let mut byte = [0u8; 1];
        loop {
            match self.reader.read(&mut byte).await {
                Ok(1) => {
                    if let Some(received) = decode(byte[0]) {
                        return received;
                    }
                }
                Ok(_) | Err(_) => std::future::pending::<()>().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        for (signal, terminal) in [
            (Signal::SIGINT, true),
            (Signal::SIGINT, false),
            (Signal::SIGTERM, false),
        ] {
            assert_eq!(
                decode(encode(signal as i32, terminal)),
                Some(Received {
                    signal,
                    from_terminal: terminal
                })
            );
        }
        assert_eq!(decode(0), None);
    }
}
