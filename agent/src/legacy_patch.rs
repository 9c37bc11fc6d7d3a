//! The patcher's stress tests as they were written against the old flat layout
//! (`patch_tests.rs`, `patch_fixtures.rs`, test-only, being replaced in parallel): they
//! run as `patch::tests::…` (one of them re-runs itself by that name) and see the
//! patcher's items through `super::*`. This module goes with them.

pub(crate) use crate::control::patch::*;
pub(crate) use crate::hot::trap::{self, Transition};

#[path = "patch_fixtures.rs"]
pub(crate) mod fixtures;

#[path = "patch_tests.rs"]
mod tests;
