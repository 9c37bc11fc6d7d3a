//! What `patchbay run` shows on stderr: a spinner while the agent connects, the live table
//! of the hottest functions while the program runs, and the final table.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use patchbay_sdk::proto::{CountsResponse, FunctionCount};

use crate::table::Table;

/// Size of the terminal on stderr, `(columns, rows)`.
pub fn terminal_size() -> Option<(usize, usize)> {
    use nix::libc;
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0 && size.ws_row > 0)
        .then(|| (usize::from(size.ws_col), usize::from(size.ws_row)))
}

/// Writes `text` to stderr and flushes; errors (a closed terminal) are ignored.
fn write_stderr(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

/// A one-line spinner on stderr (only used when stderr is a terminal).
pub struct Spinner {
    message: String,
    start: Instant,
    frame: usize,
    last: Option<Instant>,
    shown: bool,
}

impl Spinner {
    const TICK: Duration = Duration::from_millis(100);
    /// Quick waits show nothing (no flicker).
    const DELAY: Duration = Duration::from_millis(250);

    pub fn new(message: String) -> Spinner {
        Spinner {
            message,
            start: Instant::now(),
            frame: 0,
            last: None,
            shown: false,
        }
    }

    /// Redraws the line if a tick has passed since the last redraw.
    pub fn tick(&mut self) {
        let now = Instant::now();
        if now - self.start < Self::DELAY || self.last.is_some_and(|last| now - last < Self::TICK) {
            return;
        }
        self.last = Some(now);
        let frames = crate::progress::FRAMES;
        let line = crate::progress::spinner_line(
            frames[self.frame % frames.len()],
            &self.message,
            self.start.elapsed(),
        );
        self.frame += 1;
        self.shown = true;
        write_stderr(&format!("\r\x1b[2K{line}"));
    }

    /// Erases the line if it was drawn.
    pub fn clear(&mut self) {
        if std::mem::take(&mut self.shown) {
            write_stderr("\r\x1b[2K");
        }
    }
}

/// The live table, redrawn in place below the program's output.
pub struct Live {
    top: usize,
    /// Lines of the table on screen now.
    shown: usize,
    previous: HashMap<String, u64>,
    previous_at: Instant,
}

impl Live {
    /// A table of the `top` hottest functions; rates of the first refresh are measured
    /// from `since` (when the tracer went live).
    pub fn new(top: usize, since: Instant) -> Live {
        Live {
            top,
            shown: 0,
            previous: HashMap::new(),
            previous_at: since,
        }
    }

    /// Redraws the table with `counts` (sorted, hottest first) under `header`; `empty`
    /// is the line shown while nothing was counted.
    pub fn draw(&mut self, header: &str, counts: &CountsResponse, empty: &str) {
        let now = Instant::now();
        let (columns, rows) = terminal_size().unwrap_or((80, 24));
        // Header, column titles, the `more` line and one spare line must fit.
        let top = self.top.min(rows.saturating_sub(4).max(1));
        let lines = live_lines(
            header,
            empty,
            counts,
            &self.previous,
            now.saturating_duration_since(self.previous_at),
            top,
            columns,
        );
        let mut text = self.erase_sequence();
        for line in &lines {
            text.push_str(line);
            text.push('\n');
        }
        write_stderr(&text);
        self.shown = lines.len();
        self.previous = counts
            .counts
            .iter()
            .map(|c| (c.function.clone(), c.count))
            .collect();
        self.previous_at = now;
    }

    /// Redraws the table as these lines (the latency view).
    pub fn draw_lines(&mut self, lines: &[String]) {
        let mut text = self.erase_sequence();
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        write_stderr(&text);
        self.shown = lines.len();
    }

    /// Erases the table from the screen.
    pub fn clear(&mut self) {
        if self.shown > 0 {
            write_stderr(&self.erase_sequence());
            self.shown = 0;
        }
    }

    /// Moves up over the table and clears to the end of the screen.
    fn erase_sequence(&self) -> String {
        if self.shown == 0 {
            String::new()
        } else {
            format!("\x1b[{}A\x1b[J", self.shown)
        }
    }
}

/// The lines of the live table: `header`, then the `top` functions of `counts` (sorted)
/// with their calls and their calls per second since `previous` (counts `elapsed` ago),
/// or `empty` while nothing was counted, each at most `columns` characters.
pub fn live_lines(
    header: &str,
    empty: &str,
    counts: &CountsResponse,
    previous: &HashMap<String, u64>,
    elapsed: Duration,
    top: usize,
    columns: usize,
) -> Vec<String> {
    let secs = elapsed.as_secs_f64();
    let mut table = Table::new(&["FUNCTION", "CALLS", "CALLS/s"]).right(&[1, 2]);
    // Long (C++) names are shortened so that no line wraps, which would break the redraw.
    let name_width = columns.saturating_sub(32).max(16);
    for c in counts.counts.iter().take(top) {
        let delta = c
            .count
            .saturating_sub(previous.get(&c.function).copied().unwrap_or(0));
        let rate = if secs > 0.0 {
            (delta as f64 / secs).round() as u64
        } else {
            0
        };
        table.row([
            shorten(&c.function, name_width),
            c.count.to_string(),
            rate.to_string(),
        ]);
    }
    let mut lines = vec![header.to_owned()];
    if counts.counts.is_empty() {
        lines.push(empty.to_owned());
    } else {
        lines.extend(table.render().lines().map(str::to_owned));
        if counts.counts.len() > top {
            lines.push(more_line(&counts.counts[top..]));
        }
    }
    lines.into_iter().map(|l| shorten(&l, columns)).collect()
}

/// The final table: the `top` functions of `counts` (sorted) with their share of all
/// calls, a line for the rest, and the total.
pub fn final_table(counts: &CountsResponse, top: usize) -> String {
    if counts.counts.is_empty() {
        return "no calls counted\n".to_owned();
    }
    let mut table = Table::new(&["FUNCTION", "CALLS", "SHARE"]).right(&[1, 2]);
    for c in counts.counts.iter().take(top) {
        table.row([
            c.function.clone(),
            c.count.to_string(),
            share(c.count, counts.total),
        ]);
    }
    let mut text = table.render();
    if counts.counts.len() > top {
        text.push_str(&more_line(&counts.counts[top..]));
        text.push('\n');
    }
    text.push_str(&format!(
        "total: {} in {}\n",
        calls(counts.total),
        crate::format::plural(counts.counts.len(), "function")
    ));
    text
}

/// The final table of `--per-process`: for each process (oldest first) its pid, calls
/// and command line, then its `top` functions; the tree's total last.
pub fn per_process_table(counts: &CountsResponse, top: usize) -> String {
    if counts.processes.is_empty() {
        return "no process traced\n".to_owned();
    }
    let mut table = Table::new(&["PID", "FUNCTION", "CALLS", "SHARE"]).right(&[0, 2, 3]);
    for p in &counts.processes {
        let command = if p.cmdline.is_empty() {
            p.exe.clone()
        } else {
            p.cmdline.clone()
        };
        table.row([
            p.pid.to_string(),
            format!("[{command}]"),
            p.total.to_string(),
            share(p.total, counts.total),
        ]);
        for c in p.counts.iter().take(top) {
            table.row([
                String::new(),
                format!("  {}", c.function),
                c.count.to_string(),
                share(c.count, counts.total),
            ]);
        }
        if p.counts.len() > top {
            let rest = &p.counts[top..];
            table.row([
                String::new(),
                format!("  ... {} more", rest.len()),
                rest.iter().map(|c| c.count).sum::<u64>().to_string(),
                String::new(),
            ]);
        }
    }
    let mut text = table.render();
    text.push_str(&format!(
        "total: {} in {} over {} {}\n",
        calls(counts.total),
        crate::format::plural(counts.counts.len(), "function"),
        counts.processes.len(),
        if counts.processes.len() == 1 {
            "process"
        } else {
            "processes"
        }
    ));
    text
}

/// `... 3 more functions: 1234 calls`.
fn more_line(rest: &[FunctionCount]) -> String {
    let word = if rest.len() == 1 {
        "function"
    } else {
        "functions"
    };
    format!(
        "... {} more {word}: {}",
        rest.len(),
        calls(rest.iter().map(|c| c.count).sum())
    )
}

/// `1 call`, `12 calls`.
fn calls(n: u64) -> String {
    if n == 1 {
        "1 call".to_owned()
    } else {
        format!("{n} calls")
    }
}

/// `42.5%` of `total`.
fn share(count: u64, total: u64) -> String {
    if total == 0 {
        return "-".to_owned();
    }
    format!("{:.1}%", count as f64 * 100.0 / total as f64)
}

/// `text` cut to `max` characters, the last one an ellipsis when cut.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(function: &str, count: u64) -> FunctionCount {
        FunctionCount {
            function: function.into(),
            count,
            agents: 1,
        }
    }

    fn counts(rows: Vec<FunctionCount>) -> CountsResponse {
        let total = rows.iter().map(|c| c.count).sum();
        CountsResponse {
            counts: rows,
            total,
            processes: Vec::new(),
        }
    }

    #[test]
    fn live_table_shows_rates_since_the_last_refresh() {
        let now = counts(vec![
            c("parse_record", 3000),
            c("checksum", 1500),
            c("new", 10),
        ]);
        let previous: HashMap<String, u64> = [
            ("parse_record".to_owned(), 1000),
            ("checksum".to_owned(), 1500),
        ]
        .into();
        let lines = live_lines(
            "patchbay: pid 7",
            "no calls counted yet",
            &now,
            &previous,
            Duration::from_millis(500),
            20,
            80,
        );
        assert_eq!(
            lines,
            [
                "patchbay: pid 7",
                "FUNCTION      CALLS  CALLS/s",
                "parse_record   3000     4000",
                "checksum       1500        0",
                "new              10       20",
            ]
        );
    }

    #[test]
    fn live_table_keeps_the_top_and_fits_the_width() {
        let long = "a_very_long_function_name_in_some_namespace::with_a_method";
        let now = counts(vec![c(long, 9), c("b", 5), c("c", 2), c("d", 1)]);
        let lines = live_lines("h", "-", &now, &HashMap::new(), Duration::ZERO, 2, 50);
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(lines.iter().all(|l| l.chars().count() <= 50), "{lines:?}");
        assert!(lines[2].starts_with("a_very_long_funct… "), "{lines:?}");
        assert_eq!(lines[4], "... 2 more functions: 3 calls");
        // No time elapsed: rates are 0, not infinite.
        assert!(lines[3].ends_with(" 0"), "{lines:?}");

        let empty = live_lines(
            "h",
            "no calls counted yet",
            &CountsResponse::default(),
            &HashMap::new(),
            Duration::ZERO,
            5,
            80,
        );
        assert_eq!(empty, ["h", "no calls counted yet"]);
    }

    #[test]
    fn per_process_table_breaks_the_tree_down() {
        use patchbay_sdk::proto::ProcessCounts;
        let p = |pid, cmdline: &str, rows: Vec<FunctionCount>| ProcessCounts {
            pid,
            cmdline: cmdline.into(),
            total: rows.iter().map(|c| c.count).sum(),
            counts: rows,
            ..ProcessCounts::default()
        };
        let mut all = counts(vec![c("f1", 30), c("f2", 10)]);
        all.processes = vec![
            p(10, "sh -c x", vec![]),
            p(11, "./prog 2", vec![c("f1", 20), c("f2", 10)]),
            p(12, "./prog 1", vec![c("f1", 10)]),
        ];
        assert_eq!(
            per_process_table(&all, 1),
            "PID  FUNCTION      CALLS  SHARE\n \
             10  [sh -c x]         0   0.0%\n \
             11  [./prog 2]       30  75.0%\n       \
             f1             20  50.0%\n       \
             ... 1 more     10\n \
             12  [./prog 1]       10  25.0%\n       \
             f1             10  25.0%\n\
             total: 40 calls in 2 functions over 3 processes\n"
        );
        assert_eq!(
            per_process_table(&CountsResponse::default(), 5),
            "no process traced\n"
        );
    }

    #[test]
    fn final_table_has_shares_the_rest_and_a_total() {
        let all = counts(vec![
            c("parse_record", 600),
            c("checksum", 300),
            c("is_prime", 75),
            c("render_line", 25),
        ]);
        assert_eq!(
            final_table(&all, 2),
            "FUNCTION      CALLS  SHARE\n\
             parse_record    600  60.0%\n\
             checksum        300  30.0%\n\
             ... 2 more functions: 100 calls\n\
             total: 1000 calls in 4 functions\n"
        );
        let one = counts(vec![c("main", 1)]);
        assert_eq!(
            final_table(&one, 20),
            "FUNCTION  CALLS   SHARE\nmain          1  100.0%\ntotal: 1 call in 1 function\n"
        );
        assert_eq!(
            final_table(&CountsResponse::default(), 20),
            "no calls counted\n"
        );
    }

    #[test]
    fn shortens_by_characters() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcd", 3), "ab…");
        assert_eq!(shorten("éééé", 2), "é…");
    }

    #[test]
    fn live_table_erases_what_it_drew() {
        let mut live = Live::new(5, Instant::now());
        assert_eq!(live.erase_sequence(), "");
        live.shown = 4;
        assert_eq!(live.erase_sequence(), "\x1b[4A\x1b[J");
    }
}
