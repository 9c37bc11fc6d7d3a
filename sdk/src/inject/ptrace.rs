//! The few ptrace requests the injector makes, on one thread of the target, and the
//! remote call built on them. Every ptrace call is made by the thread that seized the
//! target thread (the injector runs on one blocking thread from start to end).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::checks;

const EINTR: i64 = -(libc::EINTR as i64);
/// `NT_X86_XSTATE`: the full extended state (x87, SSE, AVX, AVX-512, ...).
const NT_X86_XSTATE: libc::c_int = 0x202;

/// Why a ptrace step failed.
#[derive(Debug)]
pub enum Fail {
    /// The process (or the thread) is gone.
    Gone,
    /// A request failed.
    Os(&'static str, io::Error),
    /// The remote call did not come back as expected.
    Call(String),
}

fn os(what: &'static str) -> Fail {
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Fail::Gone
    } else {
        Fail::Os(what, e)
    }
}

/// A seized and stopped thread, with everything needed to put it back exactly.
pub struct Stopped {
    tid: i32,
    mem: File,
    regs: libc::user_regs_struct,
    xstate: Vec<u8>,
    /// A signal the stop intercepted, delivered again when the thread is released.
    pending_signal: i32,
    /// The registers to restore (the saved ones, adjusted for a syscall to restart).
    restore: libc::user_regs_struct,
}

/// Seizes `tid` and stops it (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`), saving its
/// registers and extended state.
pub fn seize(pid: u32, tid: i32, deadline: Instant) -> Result<Stopped, Fail> {
    let mem = File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Fail::Gone
            } else {
                Fail::Os("open /proc/PID/mem", e)
            }
        })?;
    // SAFETY: PTRACE_SEIZE takes no address or data pointer (options 0).
    if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, 0usize) } != 0 {
        return Err(os("PTRACE_SEIZE"));
    }
    let mut s = Stopped {
        tid,
        mem,
        // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
        regs: unsafe { std::mem::zeroed() },
        xstate: Vec::new(),
        pending_signal: 0,
        // SAFETY: as above.
        restore: unsafe { std::mem::zeroed() },
    };
    // SAFETY: PTRACE_INTERRUPT on a seized thread takes no pointers.
    if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) } != 0 {
        let e = os("PTRACE_INTERRUPT");
        s.detach_quietly();
        return Err(e);
    }
    match wait_stop(tid, deadline) {
        Ok(status) => {
            let sig = libc::WSTOPSIG(status);
            let event = (status >> 16) & 0xff;
            if !(sig == libc::SIGTRAP && event == libc::PTRACE_EVENT_STOP) {
                // A signal-delivery stop came first: keep the signal for the release.
                s.pending_signal = sig;
            }
        }
        Err(e) => {
            s.detach_quietly();
            return Err(e);
        }
    }
    s.regs = s.get_regs()?;
    s.xstate = s.get_xstate()?;
    s.restore = s.regs;
    let nr = s.regs.orig_rax as i64;
    let ret = s.regs.rax as i64;
    if nr >= 0 && ret == EINTR && checks::eintr_on_stop(nr) {
        // Interrupted by the stop itself with a plain EINTR: restart it ourselves.
        s.restore.rax = s.regs.orig_rax;
        s.restore.rip -= 2;
        s.restore.orig_rax = u64::MAX;
    }
    // Otherwise (running code, a completed call, or -ERESTART*): restoring the saved
    // registers, orig_rax included, lets the kernel restart the call as if nothing
    // happened when the thread resumes (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND
    // rewind to the call; -ERESTART_RESTARTBLOCK continues through restart_syscall).
    Ok(s)
}

/// Waits for a ptrace stop of `tid` until `deadline`; an exit is [`Fail::Gone`].
fn wait_stop(tid: i32, deadline: Instant) -> Result<i32, Fail> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our integer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r < 0 {
            return Err(os("waitpid"));
        }
        if r == tid {
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                return Err(Fail::Gone);
            }
            if libc::WIFSTOPPED(status) {
                return Ok(status);
            }
        }
        if Instant::now() >= deadline {
            return Err(Fail::Call(
                "the target thread did not stop in time".to_owned(),
            ));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

impl Stopped {
    /// The thread's id.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    fn get_regs(&self) -> Result<libc::user_regs_struct, Fail> {
        // SAFETY: user_regs_struct is plain integers; all-zero is valid.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: PTRACE_GETREGS writes one user_regs_struct into `regs`.
        if unsafe { libc::ptrace(libc::PTRACE_GETREGS, self.tid, 0usize, &mut regs) } != 0 {
            return Err(os("PTRACE_GETREGS"));
        }
        Ok(regs)
    }

    fn set_regs(&self, regs: &libc::user_regs_struct) -> Result<(), Fail> {
        // SAFETY: PTRACE_SETREGS reads one user_regs_struct from `regs`.
        if unsafe { libc::ptrace(libc::PTRACE_SETREGS, self.tid, 0usize, regs) } != 0 {
            return Err(os("PTRACE_SETREGS"));
        }
        Ok(())
    }

    fn get_xstate(&self) -> Result<Vec<u8>, Fail> {
        let mut buf = vec![0u8; 16 * 1024];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: GETREGSET writes at most iov_len bytes into `buf` and sets iov_len.
        if unsafe { libc::ptrace(libc::PTRACE_GETREGSET, self.tid, NT_X86_XSTATE, &mut iov) } != 0 {
            return Err(os("PTRACE_GETREGSET(NT_X86_XSTATE)"));
        }
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    fn set_xstate(&self, state: &[u8]) -> Result<(), Fail> {
        let mut iov = libc::iovec {
            iov_base: state.as_ptr() as *mut libc::c_void,
            iov_len: state.len(),
        };
        // SAFETY: SETREGSET reads iov_len bytes from `state`.
        if unsafe { libc::ptrace(libc::PTRACE_SETREGSET, self.tid, NT_X86_XSTATE, &mut iov) } != 0 {
            return Err(os("PTRACE_SETREGSET(NT_X86_XSTATE)"));
        }
        Ok(())
    }

    /// Reads target memory.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fail> {
        self.mem
            .read_exact_at(buf, addr)
            .map_err(|e| Fail::Os("read /proc/PID/mem", e))
    }

    /// Writes target memory.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Fail> {
        self.mem
            .write_all_at(data, addr)
            .map_err(|e| Fail::Os("write /proc/PID/mem", e))
    }

    /// Calls `func(args...)` on the stopped thread with `data` copied onto its stack
    /// (below the red zone); `args` may name the copy with [`DATA`]. The call returns to
    /// address 0, whose fault stops the thread again. Returns `rax`. The stack bytes
    /// used are put back; the registers are restored by [`Stopped::release`].
    pub fn call(
        &mut self,
        func: u64,
        args: &[u64],
        data: &[u8],
        deadline: Instant,
    ) -> Result<u64, Fail> {
        let below = self.regs.rsp - 128 - 256;
        let data_at = (below - data.len() as u64) & !15;
        let ret_slot = data_at - 8; // rsp % 16 == 8 at entry, as after a `call`
        let span = (below - ret_slot) as usize;
        let mut saved = vec![0u8; span];
        self.read(ret_slot, &mut saved)?;
        self.write(ret_slot, &0u64.to_ne_bytes())?;
        self.write(data_at, data)?;
        let mut regs = self.regs;
        regs.rip = func;
        regs.rsp = ret_slot;
        regs.rax = 0;
        // No syscall to restart while the call runs.
        regs.orig_rax = u64::MAX;
        let slots = [&mut regs.rdi, &mut regs.rsi, &mut regs.rdx, &mut regs.rcx];
        for (slot, a) in slots.into_iter().zip(args) {
            *slot = if *a == DATA { data_at } else { *a };
        }
        self.set_regs(&regs)?;
        let result = self.run_until_return(deadline);
        // Put the stack back even when the call failed (best effort if it is gone).
        let _ = self.write(ret_slot, &saved);
        result
    }

    fn run_until_return(&mut self, deadline: Instant) -> Result<u64, Fail> {
        let mut deliver = 0;
        loop {
            // SAFETY: PTRACE_CONT takes the signal to deliver as data, no pointer.
            if unsafe { libc::ptrace(libc::PTRACE_CONT, self.tid, 0usize, deliver as usize) } != 0 {
                return Err(os("PTRACE_CONT"));
            }
            let status = wait_stop(self.tid, deadline)?;
            let sig = libc::WSTOPSIG(status);
            let event = (status >> 16) & 0xff;
            deliver = 0;
            if sig == libc::SIGSEGV && event == 0 {
                let regs = self.get_regs()?;
                if regs.rip == 0 {
                    return Ok(regs.rax);
                }
                return Err(Fail::Call(format!(
                    "the injected call faulted at {:#x}",
                    regs.rip
                )));
            }
            if event == 0 && sig != libc::SIGTRAP {
                // The program's own signal arrived meanwhile: deliver it (its handler runs
                // on top of the call and returns into it).
                deliver = sig;
            }
        }
    }

    /// Restores the registers and extended state and lets the thread go (a signal
    /// intercepted by the first stop is delivered now).
    pub fn release(self) -> Result<(), Fail> {
        self.set_xstate(&self.xstate)?;
        self.set_regs(&self.restore)?;
        // SAFETY: PTRACE_DETACH takes the signal to deliver as data, no pointer.
        if unsafe {
            libc::ptrace(
                libc::PTRACE_DETACH,
                self.tid,
                0usize,
                self.pending_signal as usize,
            )
        } != 0
        {
            return Err(os("PTRACE_DETACH"));
        }
        Ok(())
    }

    /// Restores what it can and detaches, ignoring errors (the failure path).
    pub fn detach_quietly(&self) {
        if !self.xstate.is_empty() {
            let _ = self.set_xstate(&self.xstate);
            let _ = self.set_regs(&self.restore);
        }
        // SAFETY: as in `release`.
        unsafe {
            libc::ptrace(
                libc::PTRACE_DETACH,
                self.tid,
                0usize,
                self.pending_signal as usize,
            )
        };
    }
}

/// In [`Stopped::call`]'s arguments: the address of the data copied onto the stack.
pub const DATA: u64 = u64::MAX - 0x5eed;
