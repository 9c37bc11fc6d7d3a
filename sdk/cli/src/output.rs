//! Where command results go: stdout, as text for people or JSON for scripts.

use std::io::{self, Write};

use serde_json::Value;

/// The stdout of a command and the output mode chosen with `--json`.
pub struct Output {
    json: bool,
    out: Box<dyn Write>,
}

impl Output {
    pub fn new(json: bool, out: Box<dyn Write>) -> Self {
        Output { json, out }
    }

    /// True when `--json` was given.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Prints a JSON document (pretty-printed).
    pub fn document(&mut self, value: &Value) -> io::Result<()> {
        let text = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
        writeln!(self.out, "{text}")?;
        self.out.flush()
    }

    /// Prints one JSON object on one line (for streams) and flushes.
    pub fn json_line(&mut self, value: &Value) -> io::Result<()> {
        writeln!(self.out, "{value}")?;
        self.out.flush()
    }

    /// Prints text as is.
    pub fn text(&mut self, text: &str) -> io::Result<()> {
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    /// Prints one line and flushes (for streams).
    pub fn line(&mut self, line: &str) -> io::Result<()> {
        writeln!(self.out, "{line}")?;
        self.out.flush()
    }
}
