//! Latency figures (issue 12): the agents' `LatencyReport`s (cumulative snapshots per
//! tracer), merged by function name over agents, live and exited, into
//! Control.Latency's answer. Pure.

use std::collections::{BTreeMap, BTreeSet};

use patchbay_proto as pb;
use pb::latency as buckets;

use super::model::{Agent, AgentId, Caller, TracerId};
use super::{CoreError, Registry};

/// One function's figures merged over agents.
#[derive(Clone, Debug, Default)]
pub(crate) struct Merged {
    entries: u64,
    calls: u64,
    total_ns: u64,
    min_ns: Option<u64>,
    max_ns: u64,
    abandoned: u64,
    overflow: u64,
    /// Calls per bucket (TSC ticks of `tsc_hz`).
    buckets: Vec<u64>,
    /// Ticks per second of the first agent that reported (machines share one TSC).
    tsc_hz: u64,
    agents: BTreeSet<AgentId>,
}

/// Figures by function name.
pub(crate) type LatencyTable = BTreeMap<String, Merged>;

/// Adds an agent's report of one tracer into `into`.
pub(crate) fn fold_latency(agent: &Agent, report: &pb::LatencyReport, into: &mut LatencyTable) {
    for s in &report.sites {
        let (addr, name) = s
            .site
            .as_ref()
            .map(|x| (x.address, x.name.clone()))
            .unwrap_or_default();
        let name = if name.is_empty() {
            agent.name_of(addr)
        } else {
            name
        };
        let name = if name.is_empty() {
            format!("{addr:#x}")
        } else {
            name
        };
        let m = into.entry(name).or_default();
        // Figures come from agents: saturate rather than overflow on absurd values.
        m.entries = m.entries.saturating_add(s.entries);
        m.calls = m.calls.saturating_add(s.calls);
        m.total_ns = m.total_ns.saturating_add(s.total_ns);
        if s.calls > 0 {
            m.min_ns = Some(m.min_ns.map_or(s.min_ns, |v| v.min(s.min_ns)));
        }
        m.max_ns = m.max_ns.max(s.max_ns);
        m.abandoned = m.abandoned.saturating_add(s.abandoned);
        m.overflow = m.overflow.saturating_add(s.overflow);
        let n = s.buckets.len().min(buckets::BUCKETS);
        if m.buckets.len() < n {
            m.buckets.resize(n, 0);
        }
        for (a, b) in m.buckets.iter_mut().zip(&s.buckets[..n]) {
            *a = a.saturating_add(*b);
        }
        if m.tsc_hz == 0 {
            m.tsc_hz = report.tsc_hz;
        }
        m.agents.insert(agent.id);
    }
}

/// The answer row of one function.
pub(crate) fn function_latency(function: String, m: &Merged) -> pb::FunctionLatency {
    let hz = if m.tsc_hz == 0 {
        1_000_000_000
    } else {
        m.tsc_hz
    };
    let to_ns =
        |ticks: u64| (ticks as u128 * 1_000_000_000 / hz as u128).min(u64::MAX as u128) as u64;
    let min = m.min_ns.unwrap_or(0);
    let q = |p: f64| buckets::quantile(&m.buckets, p, min, m.max_ns, to_ns).unwrap_or(0);
    pb::FunctionLatency {
        function,
        calls: m.calls,
        total_ns: m.total_ns,
        min_ns: min,
        max_ns: m.max_ns,
        p50_ns: q(0.5),
        p90_ns: q(0.9),
        p99_ns: q(0.99),
        abandoned: m.abandoned,
        overflow: m.overflow,
        entries: m.entries,
        buckets: m
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != 0)
            .map(|(b, &count)| pb::LatencyBucket {
                low_ns: to_ns(buckets::bucket_low(b)),
                high_ns: if b + 1 >= buckets::BUCKETS {
                    m.max_ns
                } else {
                    to_ns(buckets::bucket_high(b))
                },
                count,
            })
            .collect(),
        agents: m.agents.len() as u32,
    }
}

impl Registry {
    /// An agent's latency snapshot of one tracer (replaces the previous one).
    pub fn latency_report(
        &mut self,
        id: AgentId,
        report: pb::LatencyReport,
    ) -> Result<(), CoreError> {
        if !self.agents.contains_key(&id) {
            return Err(CoreError::UnknownAgent(id));
        }
        if !self.tracer_applies(report.tracer_id, id) {
            return Ok(());
        }
        let a = self.agent_mut(id)?;
        for s in &report.sites {
            if let Some(site) = &s.site
                && !site.name.is_empty()
            {
                a.site_names.insert(site.address, site.name.clone());
            }
        }
        a.latency.insert(report.tracer_id, report);
        Ok(())
    }

    /// Control.Latency: a tracer's figures by function, from live agents and the
    /// archive of exited ones, largest total time first.
    pub fn latency(
        &self,
        caller: Caller,
        tracer: TracerId,
    ) -> Result<pb::LatencyResponse, CoreError> {
        let t = self.visible_tracer(caller, tracer)?;
        let mut by_name = t.archived_latency.clone();
        for a in self.agents.values() {
            if let Some(r) = a.latency.get(&tracer) {
                fold_latency(a, r, &mut by_name);
            }
        }
        let mut functions: Vec<pb::FunctionLatency> = by_name
            .iter()
            .map(|(f, m)| function_latency(f.clone(), m))
            .collect();
        functions.sort_by(|a, b| {
            b.total_ns
                .cmp(&a.total_ns)
                .then(a.function.cmp(&b.function))
        });
        Ok(pb::LatencyResponse { functions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(entries: u64, calls: u64, min: u64, max: u64, b: &[(u64, u64)]) -> pb::SiteLatency {
        let mut buckets = vec![0; buckets::BUCKETS];
        for &(ticks, n) in b {
            buckets[buckets::bucket_of(ticks)] += n;
        }
        pb::SiteLatency {
            site: Some(pb::Site {
                address: 0x1000,
                name: "f".into(),
            }),
            entries,
            calls,
            total_ns: b.iter().map(|(t, n)| t * n).sum(),
            min_ns: min,
            max_ns: max,
            abandoned: entries - calls,
            overflow: 0,
            buckets,
        }
    }

    #[test]
    fn merged_figures_take_sums_extremes_and_percentiles_from_both_agents() {
        let mut table = LatencyTable::new();
        let a = Agent::for_tests(1);
        let b = Agent::for_tests(2);
        // tsc_hz 1e9: ticks are ns.
        let r1 = pb::LatencyReport {
            tracer_id: 1,
            sites: vec![site(95, 90, 100, 100, &[(100, 90)])],
            tsc_hz: 1_000_000_000,
        };
        let r2 = pb::LatencyReport {
            tracer_id: 1,
            sites: vec![site(10, 10, 10_000, 10_000, &[(10_000, 10)])],
            tsc_hz: 1_000_000_000,
        };
        fold_latency(&a, &r1, &mut table);
        fold_latency(&b, &r2, &mut table);
        let f = function_latency("f".into(), &table["f"]);
        assert_eq!(
            (f.calls, f.entries, f.abandoned, f.agents),
            (100, 105, 5, 2)
        );
        assert_eq!((f.min_ns, f.max_ns), (100, 10_000));
        assert_eq!(f.total_ns, 9000 + 100_000);
        assert_eq!(buckets::bucket_of(f.p50_ns), buckets::bucket_of(100));
        assert_eq!(buckets::bucket_of(f.p99_ns), buckets::bucket_of(10_000));
        assert_eq!(f.buckets.iter().map(|b| b.count).sum::<u64>(), 100);
        assert!(f.buckets.iter().all(|b| b.low_ns < b.high_ns));
    }
}
