//! The in-process agent of patchbay (built out in the agent issue).
