//! Formatting of numbers, addresses, durations and lists for tables and event lines.

/// `0x7f12ab340000`.
pub fn hex(value: u64) -> String {
    format!("{value:#x}")
}

/// A duration in milliseconds for people: `850ms`, `1.5s`, `2m05s`.
pub fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// A duration in microseconds for people: `420us`, `1.234ms`, `2.500s`.
pub fn micros(us: u64) -> String {
    if us < 1000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.3}ms", us as f64 / 1000.0)
    } else {
        format!("{:.3}s", us as f64 / 1_000_000.0)
    }
}

/// A CLOCK_MONOTONIC timestamp as seconds with nanoseconds: `12345.000000042`.
pub fn timestamp(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// A comma-separated list, shortened to `max` items plus `(+N more)`; `-` when empty.
pub fn list<T: ToString>(items: &[T], max: usize) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    let shown: Vec<String> = items.iter().take(max).map(ToString::to_string).collect();
    let mut text = shown.join(",");
    if items.len() > max {
        text.push_str(&format!(" (+{} more)", items.len() - max));
    }
    text
}

/// `-` for an empty string, otherwise the string.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// `yes` / `no`.
pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `1 trampoline`, `2 trampolines`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(hex(0x7f00_1234), "0x7f001234");
        assert_eq!(hex(0), "0x0");
        assert_eq!(millis(0), "0ms");
        assert_eq!(millis(999), "999ms");
        assert_eq!(millis(1500), "1.5s");
        assert_eq!(millis(125_000), "2m05s");
        assert_eq!(micros(420), "420us");
        assert_eq!(micros(1234), "1.234ms");
        assert_eq!(micros(2_500_000), "2.500s");
        assert_eq!(timestamp(12_345_000_000_042), "12345.000000042");
        assert_eq!(list::<u32>(&[], 3), "-");
        assert_eq!(list(&[1, 2], 3), "1,2");
        assert_eq!(list(&[1, 2, 3, 4, 5], 3), "1,2,3 (+2 more)");
        assert_eq!(or_dash(""), "-");
        assert_eq!(or_dash("x"), "x");
        assert_eq!(yes_no(true), "yes");
        assert_eq!(plural(1, "agent"), "1 agent");
        assert_eq!(plural(0, "agent"), "0 agents");
    }
}
