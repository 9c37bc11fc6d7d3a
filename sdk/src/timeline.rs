//! Reading a grace period's timeline ([`GraceTimeline`], from
//! [`Client::grace_timelines`](crate::Client::grace_timelines)): where its time went,
//! as consecutive phases of its critical path.

use patchbay_proto::{GraceStep, GraceTimeline};

/// One phase of a grace period's critical path: its name and how long it took, in
/// nanoseconds (`None` when a step that bounds it was not recorded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Phase {
    /// What the phase is, in words.
    pub name: &'static str,
    /// Its duration in nanoseconds.
    pub ns: Option<u64>,
}

/// The phase names, in order (what [`phases`] returns).
pub const PHASES: [&str; 6] = [
    "request to agent",
    "unpatch",
    "epoch bump, thread scan, Retired",
    "until the last holdout's evidence",
    "agent thread sees it",
    "report to authorization",
];

fn first(t: &GraceTimeline, step: GraceStep) -> Option<u64> {
    t.steps
        .iter()
        .find(|s| s.step == step as i32)
        .map(|s| s.at_ns)
}

/// The critical path of `t`, as the consecutive phases named in [`PHASES`]: from the
/// server's first step (the detach, or the `Remove` it sent) to the agent receiving
/// `Remove`; the unpatch; the epoch bump, thread scan and `Retired` report; from there
/// to the last evidence the agent needed (a handler's stamp, a blocked probe, an exit);
/// to the agent thread seeing it; and from there to the server's `AuthorizeFree`.
/// A phase whose bounds were not recorded (e.g. the agent's steps, which arrive after
/// the free) is `None`.
pub fn phases(t: &GraceTimeline) -> Vec<Phase> {
    let start = t.steps.first().map(|s| s.at_ns);
    let received = first(t, GraceStep::AgentRemoveReceived);
    let unpatched = first(t, GraceStep::AgentUnpatched);
    let retired = first(t, GraceStep::AgentRetiredSent);
    let authorized = first(t, GraceStep::ServerAuthorizeSent);
    let before_auth =
        |s: &&patchbay_proto::GraceTimelineStep| authorized.is_none_or(|a| s.at_ns <= a);
    // The last holdout seen by the agent thread (a stamp it reported, a blocked probe,
    // an exit) before the authorization ...
    let seen = t
        .steps
        .iter()
        .filter(before_auth)
        .filter(|s| {
            s.step == GraceStep::AgentStampSeen as i32
                || s.step == GraceStep::AgentProbeBlocked as i32
                || s.step == GraceStep::AgentThreadExited as i32
        })
        .map(|s| s.at_ns)
        .max();
    // ... and the program-side evidence before it (the handler's or a deferred stamp).
    let evidence = seen.map(|seen| {
        t.steps
            .iter()
            .filter(|s| s.at_ns <= seen)
            .filter(|s| {
                s.step == GraceStep::AgentHandlerStamped as i32
                    || s.step == GraceStep::AgentDeferredStamped as i32
            })
            .map(|s| s.at_ns)
            .max()
            .filter(|&e| retired.is_none_or(|r| e >= r))
            .unwrap_or(seen)
    });
    let marks = [
        start, received, unpatched, retired, evidence, seen, authorized,
    ];
    PHASES
        .iter()
        .enumerate()
        .map(|(i, name)| Phase {
            name,
            ns: match (marks[i], marks[i + 1]) {
                (Some(a), Some(b)) if b >= a => Some(b - a),
                _ => None,
            },
        })
        .collect()
}

/// From the server's first step to `AuthorizeFree`, in nanoseconds.
pub fn total_ns(t: &GraceTimeline) -> Option<u64> {
    let start = t.steps.first()?.at_ns;
    first(t, GraceStep::ServerAuthorizeSent).map(|a| a.saturating_sub(start))
}

/// Whether the agent's steps arrived (they come once it freed the trampoline).
pub fn has_agent_steps(t: &GraceTimeline) -> bool {
    first(t, GraceStep::AgentRemoveReceived).is_some()
}

/// A step's name in lowercase words (`signal sent`), and which side recorded it.
pub fn step_name(step: i32) -> (&'static str, String) {
    match GraceStep::try_from(step) {
        Ok(s) => {
            let n = s.as_str_name();
            let (side, rest) = n.split_once('_').unwrap_or(("", n));
            let side = match side {
                "AGENT" => "agent",
                "SERVER" => "server",
                _ => "-",
            };
            (side, rest.to_lowercase().replace('_', " "))
        }
        Err(_) => ("-", format!("step {step}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_proto::GraceTimelineStep;

    fn t(steps: &[(u64, GraceStep, u32)]) -> GraceTimeline {
        GraceTimeline {
            steps: steps
                .iter()
                .map(|&(at_ns, s, tid)| GraceTimelineStep {
                    at_ns,
                    step: s as i32,
                    tid,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn phases_follow_the_critical_path() {
        use GraceStep::*;
        let tl = t(&[
            (1000, ServerDetachReceived, 0),
            (1000, ServerRemoveSent, 0),
            (1100, AgentRemoveReceived, 0),
            (1300, AgentUnpatched, 0),
            (1350, AgentEpochBumped, 0),
            (1400, AgentRetiredSent, 0),
            (1410, AgentSignalSent, 7),
            (1420, AgentProbeBlocked, 8),
            (1450, ServerRetiredReceived, 0),
            (1500, AgentHandlerStamped, 7),
            (1560, AgentWoken, 0),
            (1570, AgentStampSeen, 7),
            (1600, ServerStampReceived, 7),
            (1610, ServerAuthorizeSent, 0),
            (1700, AgentFreed, 0),
        ]);
        let p: Vec<Option<u64>> = phases(&tl).iter().map(|p| p.ns).collect();
        assert_eq!(
            p,
            [
                Some(100),
                Some(200),
                Some(100),
                Some(100),
                Some(70),
                Some(40)
            ]
        );
        assert_eq!(total_ns(&tl), Some(610));
        assert!(has_agent_steps(&tl));
        assert_eq!(
            step_name(AgentSignalSent as i32),
            ("agent", "signal sent".into())
        );
        assert_eq!(step_name(999).1, "step 999");
    }

    #[test]
    fn missing_agent_steps_leave_phases_unknown() {
        use GraceStep::*;
        let tl = t(&[
            (1000, ServerRemoveSent, 0),
            (1450, ServerRetiredReceived, 0),
            (1610, ServerAuthorizeSent, 0),
        ]);
        assert!(phases(&tl).iter().all(|p| p.ns.is_none()));
        assert_eq!(total_ns(&tl), Some(610));
        assert!(!has_agent_steps(&tl));
    }
}
