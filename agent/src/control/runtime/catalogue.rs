//! The function catalogue: every function site discovered in the objects loaded in
//! this process (the first discovery, then objects `dlopen`ed since), answered to the
//! server's `ListFunctions`, and looked up by address when installing and reporting.

use std::collections::HashMap;

use patchbay_proto as pb;

use crate::control::patch::{Op, Patcher};
use crate::control::sites::{self, Discoverer, FunctionSite, SiteKind};
use crate::control::{log, unmapped};
use crate::hot::ranges;
use crate::sys::dl::Span;

/// The functions of this process.
pub(crate) struct Catalogue {
    discoverer: Discoverer,
    functions: Vec<FunctionSite>,
    by_addr: HashMap<u64, usize>,
    discovered: bool,
    /// `sites::load_generation()` read before the last discovery.
    load_seen: (u64, u64),
    /// Functions discovered in objects loaded after the first discovery and not yet
    /// announced to the server (`FunctionsAdded`).
    unannounced: u32,
    /// Recent patterns' matches: (how many of `functions` were matched, the indices
    /// of the matching ones). `functions` only grows (but for objects unloaded: then it is emptied), so a pattern asked again (each
    /// `FunctionsAdded` re-lists every tracer's) matches only the new functions: a
    /// `dlopen` waiting for its coverage does not pay for the whole catalogue.
    matches: HashMap<String, (usize, Vec<usize>)>,
    /// Sites of functions of objects unloaded (`dlclose`) and not yet reported.
    removed: Vec<u64>,
}

/// Patterns whose matches are kept (the cache is emptied when it would grow beyond).
const MATCHES_KEPT: usize = 32;

impl Catalogue {
    pub(crate) fn new() -> Catalogue {
        Catalogue {
            discoverer: Discoverer::new(),
            functions: Vec::new(),
            by_addr: HashMap::new(),
            discovered: false,
            load_seen: (0, 0),
            unannounced: 0,
            matches: HashMap::new(),
            removed: Vec::new(),
        }
    }

    /// Discovers every loaded object's functions (the first time) or those of objects
    /// loaded since (later). `call __fentry__` sites become nops at once.
    pub(crate) fn discover(&mut self) {
        // Read first: an object loaded during the scan is seen by the next one.
        self.load_seen = sites::load_generation();
        let later = self.discovered;
        self.discovered = true;
        let discoverer = &mut self.discoverer;
        // Objects unmapped since (`dlclose`), taken with the snapshot: an object mapped
        // at their addresses since is discovered by this scan, after their functions
        // are forgotten.
        let (gone, new) = unmapped::drain(|gone| {
            for s in gone {
                discoverer.forget(s.bias);
            }
            if later {
                discoverer.discover_new()
            } else {
                discoverer.discover_all()
            }
        });
        if !gone.is_empty() {
            self.forget(&gone);
        }
        match new {
            Ok(list) => {
                if later {
                    self.unannounced = self
                        .unannounced
                        .saturating_add(u32::try_from(list.len()).unwrap_or(u32::MAX));
                }
                let mut neutralize = Vec::new();
                for mut f in list {
                    if f.name.starts_with("patchbay_agent::") {
                        f.patchable = false;
                        f.reason = Some("the agent's own code is never traced".into());
                    }
                    if f.patchable && matches!(f.kind, SiteKind::Fentry) {
                        neutralize.push(Op::Nop {
                            site: f.address as usize,
                        });
                    }
                    if f.patchable && f.kind == SiteKind::FentryGot {
                        neutralize.push(Op::NopFentryGot {
                            site: f.address as usize,
                        });
                    }
                    self.by_addr.insert(f.address, self.functions.len());
                    self.functions.push(f);
                }
                // `call __fentry__` sites become nops now, once: cheaper untraced calls,
                // and the form every later patch starts from.
                if !neutralize.is_empty() {
                    match Patcher::global().and_then(|p| p.apply(&neutralize)) {
                        Ok(r) => {
                            log::debug(&format!("{} fentry calls turned into nops", r.changed))
                        }
                        Err(e) => {
                            log::warn(&format!("cannot neutralize fentry calls: {e}"));
                            for op in neutralize {
                                if let Some(&i) = self.by_addr.get(&(op.site() as u64)) {
                                    self.functions[i].patchable = false;
                                    self.functions[i].reason = Some(format!("cannot patch: {e}"));
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => log::warn(&format!("site discovery failed: {e}")),
        }
    }

    /// Drops the functions of objects unmapped since (their sites are reported by
    /// [`Self::take_removed`]) and the patcher's record of their original bytes.
    fn forget(&mut self, gone: &[Span]) {
        let inside = |a: u64| gone.iter().any(|s| s.start <= a && a < s.end);
        let removed = &mut self.removed;
        self.functions.retain(|f| {
            let keep = !inside(f.address);
            if !keep {
                removed.push(f.address);
            }
            keep
        });
        self.by_addr = self
            .functions
            .iter()
            .enumerate()
            .map(|(i, f)| (f.address, i))
            .collect();
        // Indices moved: patterns are matched afresh.
        self.matches.clear();
        if let Ok(p) = Patcher::global() {
            for s in gone {
                p.forget_range(s.start as usize, s.end as usize);
            }
        }
    }

    /// Sites of functions of objects unloaded since the last call.
    pub(crate) fn take_removed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.removed)
    }

    /// The first discovery, if it has not happened yet.
    pub(crate) fn discover_if_needed(&mut self) {
        if !self.discovered {
            self.discover();
        }
    }

    /// Discovers the objects loaded (`dlopen`) since the last discovery, if any.
    pub(crate) fn discover_loaded_since(&mut self) {
        if self.discovered && sites::load_generation() != self.load_seen {
            self.discover();
        }
    }

    /// How many functions were discovered since the last call (in objects loaded after
    /// the first discovery), to announce in a `FunctionsAdded`.
    pub(crate) fn take_unannounced(&mut self) -> u32 {
        std::mem::take(&mut self.unannounced)
    }

    /// Adds a function by hand (tests of the installer).
    #[cfg(test)]
    pub(crate) fn insert_for_test(&mut self, f: FunctionSite) {
        self.discovered = true;
        self.by_addr.insert(f.address, self.functions.len());
        self.functions.push(f);
    }

    /// The function whose patch site is `site`.
    pub(crate) fn get(&self, site: u64) -> Option<&FunctionSite> {
        self.by_addr.get(&site).map(|&i| &self.functions[i])
    }

    /// The demangled name of the function whose site is `site` ("" if unknown).
    pub(crate) fn name_of(&self, site: u64) -> String {
        self.get(site).map(|f| f.name.clone()).unwrap_or_default()
    }

    /// `site` with its function's name.
    pub(crate) fn site(&self, site: u64) -> pb::Site {
        pb::Site {
            address: site,
            name: self.name_of(site),
        }
    }

    /// The function containing `pc` (`<trampoline>` in trampoline memory, "" unknown).
    pub(crate) fn symbol(&self, pc: u64) -> String {
        if pc == 0 {
            return String::new();
        }
        if ranges::in_trampoline(pc) {
            return "<trampoline>".into();
        }
        self.functions
            .iter()
            .find(|f| f.function_address <= pc && pc < f.function_address + f.size.max(1))
            .map(|f| f.name.clone())
            .unwrap_or_default()
    }

    /// The functions whose names match `pattern`, in discovery order.
    fn matching(&mut self, pattern: &str) -> Result<Vec<&FunctionSite>, sites::PatternError> {
        if !self.matches.contains_key(pattern) && self.matches.len() >= MATCHES_KEPT {
            self.matches.clear();
        }
        let (seen, mut found) = self.matches.remove(pattern).unwrap_or_default();
        let pat = sites::compile_pattern(pattern)?;
        for (i, f) in self.functions.iter().enumerate().skip(seen) {
            if f.names().any(|n| pat.matches(n)) {
                found.push(i);
            }
        }
        self.matches
            .insert(pattern.to_owned(), (self.functions.len(), found));
        let (_, idx) = &self.matches[pattern];
        Ok(idx.iter().map(|&i| &self.functions[i]).collect())
    }

    /// The answer to `ListFunctions` (discovering first: everything the first time,
    /// then the objects loaded since, if the loader's counters moved).
    pub(crate) fn list(&mut self, l: pb::ListFunctions) -> pb::FunctionList {
        self.discover_if_needed();
        self.discover_loaded_since();
        match self.matching(&l.pattern) {
            Ok(found) => {
                // Attaching needs only patchable functions; when none matches, a few
                // unpatchable ones go along so the server can say why.
                let any_patchable = found.iter().any(|f| f.patchable);
                let mut examples = 0;
                let keep: Vec<&FunctionSite> = found
                    .iter()
                    .copied()
                    .filter(|f| {
                        if f.patchable || !l.patchable_only {
                            return true;
                        }
                        examples += 1;
                        !any_patchable && examples <= 5
                    })
                    .collect();
                let unpatchable_matches = if l.patchable_only {
                    (found.len() - keep.len()) as u32
                } else {
                    0
                };
                pb::FunctionList {
                    request_id: l.request_id,
                    unpatchable_matches,
                    functions: keep
                        .into_iter()
                        .map(|f| pb::Function {
                            name: f.name.clone(),
                            mangled: f.mangled.clone(),
                            address: f.address,
                            object: f.object.display().to_string(),
                            patchable: f.patchable,
                            site_kind: match f.kind {
                                SiteKind::Fentry => pb::SiteKind::Fentry,
                                SiteKind::FentryGot => pb::SiteKind::FentryGot,
                                SiteKind::Nop5 => pb::SiteKind::Nop5,
                                SiteKind::NopSled => pb::SiteKind::NopSled,
                                SiteKind::Relocated => pb::SiteKind::Relocated,
                                SiteKind::None => pb::SiteKind::Unspecified,
                            } as i32,
                            reason: f.reason.clone().unwrap_or_default(),
                        })
                        .collect(),
                    error: String::new(),
                }
            }
            Err(e) => pb::FunctionList {
                request_id: l.request_id,
                functions: vec![],
                error: e.to_string(),
                unpatchable_matches: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;

    fn add(c: &mut Catalogue, name: &str) {
        let address = 0x1000 * (c.functions.len() as u64 + 1);
        c.by_addr.insert(address, c.functions.len());
        c.functions.push(FunctionSite {
            name: name.into(),
            mangled: name.into(),
            aliases: vec![],
            address,
            function_address: address,
            size: 16,
            object: Arc::from(Path::new("/x.so")),
            kind: SiteKind::Nop5,
            bytes: vec![0x0f, 0x1f, 0x44, 0x00, 0x00],
            patchable: true,
            reason: None,
            known_targets: Vec::new(),
        });
    }

    fn names(c: &mut Catalogue, pattern: &str) -> Vec<String> {
        c.matching(pattern)
            .expect("a valid pattern")
            .iter()
            .map(|f| f.name.clone())
            .collect()
    }

    /// A pattern asked again is matched only against functions discovered since, and
    /// the answer is the same as a full match, in discovery order; the cache stays
    /// bounded.
    #[test]
    fn repeated_patterns_match_new_functions_exactly() {
        let mut c = Catalogue::new();
        add(&mut c, "alpha");
        add(&mut c, "beta");
        assert_eq!(names(&mut c, "a*"), ["alpha"]);
        add(&mut c, "apple");
        add(&mut c, "gamma");
        add(&mut c, "ant");
        assert_eq!(names(&mut c, "a*"), ["alpha", "apple", "ant"]);
        assert_eq!(c.matches["a*"].0, 5, "matched up to the end");
        assert_eq!(names(&mut c, "*a"), ["alpha", "beta", "gamma"]);
        for i in 0..2 * MATCHES_KEPT {
            names(&mut c, &format!("p{i}*"));
            assert!(c.matches.len() <= MATCHES_KEPT);
        }
        add(&mut c, "avocado");
        assert_eq!(names(&mut c, "a*"), ["alpha", "apple", "ant", "avocado"]);
        assert!(c.matching("[").is_err(), "a malformed pattern");
    }
}
