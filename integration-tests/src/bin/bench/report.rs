//! The figures of one run: one table on stdout, one JSON file.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::Plan;

/// A design target a figure is checked against.
#[derive(Debug, Clone)]
pub struct Goal {
    /// What the target says, e.g. "<= 2 ns added".
    pub text: String,
    pub met: bool,
}

/// One figure: the median of `samples` (absent when skipped).
#[derive(Debug, Clone)]
pub struct Figure {
    /// Stable key in the JSON, e.g. `percall.count.t1`.
    pub id: String,
    pub section: &'static str,
    pub label: String,
    /// Threads involved (per-call loops, grace periods), sites (attach), none.
    pub threads: Option<u32>,
    pub unit: &'static str,
    pub samples: Vec<f64>,
    /// Short text after the value (ratios, drops).
    pub note: String,
    pub goal: Option<Goal>,
    /// Why the figure could not be measured.
    pub skipped: Option<String>,
    /// Extra numbers for the JSON (counts, sites patched, …).
    pub detail: Value,
}

impl Figure {
    pub fn new(
        id: impl Into<String>,
        section: &'static str,
        label: impl Into<String>,
        unit: &'static str,
        samples: Vec<f64>,
    ) -> Figure {
        Figure {
            id: id.into(),
            section,
            label: label.into(),
            threads: None,
            unit,
            samples,
            note: String::new(),
            goal: None,
            skipped: None,
            detail: json!({}),
        }
    }

    pub fn skipped(
        id: impl Into<String>,
        section: &'static str,
        label: impl Into<String>,
        unit: &'static str,
        why: impl Into<String>,
    ) -> Figure {
        let mut f = Figure::new(id, section, label, unit, vec![]);
        f.skipped = Some(why.into());
        f
    }

    pub fn threads(mut self, t: u32) -> Figure {
        self.threads = Some(t);
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Figure {
        self.note = n.into();
        self
    }

    pub fn goal(mut self, text: impl Into<String>, met: bool) -> Figure {
        self.goal = Some(Goal {
            text: text.into(),
            met,
        });
        self
    }

    pub fn detail(mut self, d: Value) -> Figure {
        self.detail = d;
        self
    }

    /// The median of the samples (None when there are none).
    pub fn median(&self) -> Option<f64> {
        median(&self.samples)
    }
}

/// Median of `v` (the upper one of an even count); None when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// Quantile `q` (0..=1) of `v`, nearest rank.
pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[((v.len() - 1) as f64 * q).round() as usize])
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// All figures of a run plus the headline lines.
pub struct Report {
    plan: Plan,
    /// /proc/loadavg when the run started (other work on the machine skews figures).
    load_start: String,
    pub figures: Vec<Figure>,
    pub headlines: Vec<String>,
}

impl Report {
    pub fn new(plan: &Plan) -> Report {
        Report {
            plan: plan.clone(),
            load_start: loadavg(),
            figures: Vec::new(),
            headlines: Vec::new(),
        }
    }

    pub fn push(&mut self, f: Figure) {
        match (&f.skipped, f.median()) {
            (Some(why), _) => eprintln!("  {:<44} skipped: {why}", f.label),
            (None, Some(m)) => eprintln!("  {:<44} {m:>12.3} {} {}", f.label, f.unit, f.note),
            (None, None) => eprintln!("  {:<44} (no samples)", f.label),
        }
        self.figures.push(f);
    }

    /// The median of figure `id`, if measured.
    pub fn value(&self, id: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.id == id)
            .and_then(|f| f.median())
    }

    pub fn print(&self) {
        let p = &self.plan;
        println!(
            "\npatchbay bench{} — {} cores, {}, kernel {}; medians over repeated runs",
            if p.quick { " (--quick)" } else { "" },
            p.cores,
            machine().1,
            machine().0,
        );
        println!(
            "load average at start: {}, at end: {}\n",
            self.load_start,
            loadavg()
        );
        println!(
            "{:<8} {:<46} {:>6} {:>12} {:<9} {:<30} TARGET",
            "SECTION", "FIGURE", "N", "MEDIAN", "UNIT", "NOTE"
        );
        let mut last = "";
        for f in &self.figures {
            if f.section != last && !last.is_empty() {
                println!();
            }
            last = f.section;
            let n = f.threads.map(|t| t.to_string()).unwrap_or_default();
            let goal = f
                .goal
                .as_ref()
                .map(|g| format!("{} {}", g.text, if g.met { "(met)" } else { "(MISSED)" }))
                .unwrap_or_default();
            match (&f.skipped, f.median()) {
                (Some(why), _) => println!(
                    "{:<8} {:<46} {:>6} {:>12} {:<9} skipped: {why}",
                    f.section, f.label, n, "-", f.unit
                ),
                (None, m) => println!(
                    "{:<8} {:<46} {:>6} {:>12} {:<9} {:<30} {goal}",
                    f.section,
                    f.label,
                    n,
                    m.map_or("-".into(), fmt_value),
                    f.unit,
                    f.note,
                ),
            }
        }
        if !self.headlines.is_empty() {
            println!();
            for h in &self.headlines {
                println!("{h}");
            }
        }
    }

    pub fn write_json(&self, path: &Path, elapsed: Duration) -> anyhow::Result<()> {
        let (kernel, cpu) = machine();
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                json!({
                    "id": f.id,
                    "section": f.section,
                    "label": f.label,
                    "n": f.threads,
                    "unit": f.unit,
                    "median": f.median(),
                    "p90": quantile(&f.samples, 0.9),
                    "samples": f.samples,
                    "note": f.note,
                    "target": f.goal.as_ref().map(|g| json!({"text": g.text, "met": g.met})),
                    "skipped": f.skipped,
                    "detail": f.detail,
                })
            })
            .collect();
        let doc = json!({
            "quick": self.plan.quick,
            "machine": {"cores": self.plan.cores, "kernel": kernel, "cpu": cpu},
            "loadavg": {"start": self.load_start, "end": loadavg()},
            "elapsed_s": elapsed.as_secs_f64(),
            "figures": figures,
            "headlines": self.headlines,
        });
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        Ok(())
    }
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// (kernel release, CPU model) of this machine.
pub fn machine() -> (String, String) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    (kernel, cpu)
}
