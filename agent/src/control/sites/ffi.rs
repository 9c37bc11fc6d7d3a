//! The loader's list of loaded objects, through `dl_iterate_phdr(3)`.
//!
//! Everything is copied out while the loader holds its lock, so that no pointer into an
//! object escapes the callback (the object could be unloaded right after).

use std::ffi::{CStr, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// One `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoadSegment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub flags: u32,
}

/// One loaded object as the dynamic loader knows it.
#[derive(Debug, Clone)]
pub(crate) struct PhdrInfo {
    /// `dlpi_name`: empty for the main executable.
    pub name: Vec<u8>,
    /// `dlpi_addr`: run-time address minus link-time address.
    pub bias: u64,
    /// The `PT_LOAD` headers, in order.
    pub loads: Vec<LoadSegment>,
    /// The GNU build id read from the object's notes in memory, if any.
    pub build_id: Option<Vec<u8>>,
}

/// Every object loaded in this process, main executable first.
pub(crate) fn loaded_objects() -> Vec<PhdrInfo> {
    let mut out: Vec<PhdrInfo> = Vec::new();
    // SAFETY: `callback` matches the signature dl_iterate_phdr expects, and `data` points
    // to `out`, which outlives the call and is only accessed by `callback` during it
    // (dl_iterate_phdr calls it synchronously on this thread).
    unsafe {
        libc::dl_iterate_phdr(Some(callback), (&raw mut out).cast::<c_void>());
    }
    out
}

/// `(dlpi_adds, dlpi_subs)`: how many objects the process ever loaded and unloaded.
/// Changes with every `dlopen`/`dlclose` that maps or unmaps an object; cheap (the
/// iteration stops at the first object).
pub(crate) fn load_counts() -> (u64, u64) {
    let mut out = (0u64, 0u64);
    // SAFETY: as in `loaded_objects`, with `counts_callback` and a `(u64, u64)`.
    unsafe {
        libc::dl_iterate_phdr(Some(counts_callback), (&raw mut out).cast::<c_void>());
    }
    out
}

unsafe extern "C" fn counts_callback(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> c_int {
    // SAFETY: `data` is the `&mut (u64, u64)` of `load_counts`; the loader passes a
    // valid `dl_phdr_info` (glibc always fills `dlpi_adds` and `dlpi_subs`).
    unsafe {
        let out = &mut *data.cast::<(u64, u64)>();
        *out = ((*info).dlpi_adds, (*info).dlpi_subs);
    }
    1
}

unsafe extern "C" fn callback(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> c_int {
    // A panic must not unwind into the C loader: stop the iteration instead.
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `data` is the `&mut Vec<PhdrInfo>` passed by `loaded_objects`, not
        // aliased during the call.
        let out = unsafe { &mut *data.cast::<Vec<PhdrInfo>>() };
        // SAFETY: the loader passes a valid `dl_phdr_info` for the duration of the call.
        let info = unsafe { &*info };
        out.push(copy_info(info));
        0
    }))
    .unwrap_or(1)
}

fn copy_info(info: &libc::dl_phdr_info) -> PhdrInfo {
    let name = if info.dlpi_name.is_null() {
        Vec::new()
    } else {
        // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader,
        // valid while the callback runs.
        unsafe { CStr::from_ptr(info.dlpi_name) }
            .to_bytes()
            .to_vec()
    };
    let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() || info.dlpi_phnum == 0 {
        &[]
    } else {
        // SAFETY: the loader guarantees `dlpi_phdr` points to `dlpi_phnum` program
        // headers of the loaded object, mapped while the callback runs.
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
    };
    let bias = info.dlpi_addr;
    let loads = phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .map(|p| LoadSegment {
            vaddr: p.p_vaddr,
            memsz: p.p_memsz,
            offset: p.p_offset,
            filesz: p.p_filesz,
            flags: p.p_flags,
        })
        .collect::<Vec<_>>();
    let mut build_id = None;
    for p in phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
        // Only read notes that lie inside a loaded, file-backed part of a segment.
        let inside = loads.iter().any(|l| {
            p.p_vaddr >= l.vaddr
                && p.p_vaddr.saturating_add(p.p_memsz) <= l.vaddr.saturating_add(l.filesz)
        });
        if !inside || p.p_memsz == 0 {
            continue;
        }
        let start = bias.wrapping_add(p.p_vaddr) as *const u8;
        // SAFETY: the note segment lies within a PT_LOAD segment's file-backed part
        // (checked above), which the loader has mapped readable at `bias + p_vaddr`;
        // the object cannot be unloaded while the callback runs (the loader lock is held).
        let bytes = unsafe { std::slice::from_raw_parts(start, p.p_memsz as usize) };
        if let Some(id) = gnu_build_id(bytes, p.p_align) {
            build_id = Some(id);
            break;
        }
    }
    PhdrInfo {
        name,
        bias,
        loads,
        build_id,
    }
}

/// The descriptor of the `NT_GNU_BUILD_ID` note in a note segment's bytes.
pub(crate) fn gnu_build_id(mut notes: &[u8], align: u64) -> Option<Vec<u8>> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let align = if align == 8 { 8 } else { 4 };
    let pad = |n: usize| n.div_ceil(align) * align;
    let word = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
    };
    while notes.len() >= 12 {
        let namesz = word(notes, 0)? as usize;
        let descsz = word(notes, 4)? as usize;
        let ntype = word(notes, 8)?;
        let name_start: usize = 12;
        let desc_start = name_start.checked_add(pad(namesz))?;
        let next = desc_start.checked_add(pad(descsz))?;
        let name = notes.get(name_start..name_start + namesz)?;
        let desc = notes.get(desc_start..desc_start + descsz)?;
        if ntype == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return Some(desc.to_vec());
        }
        notes = notes.get(next..).unwrap_or(&[]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_main_executable_and_libc() {
        let objs = loaded_objects();
        assert!(!objs.is_empty());
        assert!(objs[0].name.is_empty(), "main executable first");
        assert!(!objs[0].loads.is_empty());
        assert!(
            objs.iter()
                .any(|o| String::from_utf8_lossy(&o.name).contains("libc.so")),
            "{objs:?}"
        );
    }

    #[test]
    fn build_id_note_parsing() {
        let mut n = Vec::new();
        // An unrelated note first (4-byte aligned), then the build id.
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&3u32.to_le_bytes());
        n.extend_from_slice(&1u32.to_le_bytes());
        n.extend_from_slice(b"XYZ\0\x01\x02\x03\0");
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&5u32.to_le_bytes());
        n.extend_from_slice(&3u32.to_le_bytes());
        n.extend_from_slice(b"GNU\0\xaa\xbb\xcc\xdd\xee\0\0\0");
        assert_eq!(
            gnu_build_id(&n, 4),
            Some(vec![0xaa, 0xbb, 0xcc, 0xdd, 0xee])
        );
        assert_eq!(gnu_build_id(&n[..20], 4), None);
    }
}
