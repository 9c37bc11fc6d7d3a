//! A spinner on stderr while the CLI waits for the server, shown only on a terminal.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
const TICK: Duration = Duration::from_millis(100);

/// Runs `fut`, showing `message` with a spinner and the elapsed time on stderr when stderr
/// is a terminal. Ctrl-C while waiting clears the line and exits with status 130.
pub async fn wait<F: Future>(message: &str, fut: F) -> F::Output {
    if !std::io::stderr().is_terminal() {
        return fut.await;
    }
    let start = Instant::now();
    let mut ticker = tokio::time::interval(TICK);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(fut, ctrl_c);
    let mut frame = 0usize;
    let output = loop {
        tokio::select! {
            output = &mut fut => break output,
            _ = &mut ctrl_c => {
                clear();
                eprintln!("interrupted");
                std::process::exit(130);
            }
            _ = ticker.tick() => {
                let line = spinner_line(FRAMES[frame % FRAMES.len()], message, start.elapsed());
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
                frame += 1;
            }
        }
    };
    clear();
    output
}

fn clear() {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[2K");
    let _ = err.flush();
}

pub fn spinner_line(frame: char, message: &str, elapsed: Duration) -> String {
    format!("{frame} {message} ({:.1}s)", elapsed.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_message_and_elapsed_time() {
        assert_eq!(
            spinner_line(
                '/',
                "waiting for a grace period",
                Duration::from_millis(1234)
            ),
            "/ waiting for a grace period (1.2s)"
        );
    }

    #[tokio::test]
    async fn passes_the_result_through() {
        assert_eq!(wait("x", async { 7 }).await, 7);
    }
}
