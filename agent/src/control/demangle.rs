//! Symbol demangling: Rust (legacy and v0, without the hash) and C++ (Itanium ABI).
//!
//! Plain C names, and anything that fails to demangle, are returned unchanged.

/// Demangles a symbol name for display and pattern matching.
///
/// - Rust legacy (`_ZN…17h<hash>E`) and v0 (`_R…`) names become `crate::module::function`
///   (no hash, no crate disambiguator);
/// - C++ names (`_Z…`) become their demangled form, e.g. `ns::f(int)`;
/// - everything else is returned as it is.
pub fn demangle(name: &str) -> String {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        return format!("{d:#}");
    }
    if name.starts_with("_Z")
        && let Ok(sym) = cpp_demangle::Symbol::new(name)
        && let Ok(s) = sym.demangle()
    {
        return s;
    }
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::demangle;

    #[test]
    fn plain_c_is_unchanged() {
        assert_eq!(demangle("main"), "main");
        assert_eq!(demangle("helper.constprop.0"), "helper.constprop.0");
        assert_eq!(demangle(""), "");
    }

    #[test]
    fn rust_legacy_without_hash() {
        assert_eq!(
            demangle("_ZN7fixture6module8function17h0123456789abcdefE"),
            "fixture::module::function"
        );
    }

    #[test]
    fn rust_v0_without_disambiguator() {
        assert_eq!(
            demangle("_RNvNtCsai4GBYXPky7_7fixture6module8function"),
            "fixture::module::function"
        );
    }

    #[test]
    fn cpp() {
        assert_eq!(demangle("_ZN3foo3barEv"), "foo::bar()");
        assert_eq!(demangle("_Z3addii"), "add(int, int)");
    }

    #[test]
    fn malformed_mangling_is_kept() {
        assert_eq!(demangle("_Znotvalid"), "_Znotvalid");
        assert_eq!(demangle("_RNvXYZ"), "_RNvXYZ");
    }
}
