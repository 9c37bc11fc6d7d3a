//! Site discovery over the objects loaded in this process.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, Object, elf};

use super::elf::{Relocation, analyze_link_time, rebase};
use super::ffi::{self, LoadSegment, PhdrInfo};
use super::{FunctionSite, SitesError};
use crate::sys::procfs::{Mapping, read_maps_containing};

/// One object loaded in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedObject {
    /// The file it was read from (absolute, from `/proc/self/maps`).
    pub path: Arc<Path>,
    /// Run-time address minus link-time address.
    pub bias: u64,
    /// Device and inode of the file that was read.
    pub dev: u64,
    pub inode: u64,
    /// Number of entries it contributed (sites and non-instrumented functions).
    pub functions: usize,
}

/// An object whose functions could not be listed, and why.
#[derive(Debug)]
pub struct SkippedObject {
    /// The loader's name for it (`linux-vdso.so.1`, a path, or `<main>`).
    pub name: String,
    pub bias: u64,
    pub error: SitesError,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileKey {
    path: PathBuf,
    dev: u64,
    inode: u64,
}

/// What a file gave, at link-time addresses.
struct Analysis {
    sites: Arc<Vec<FunctionSite>>,
    loads: Vec<LoadSegment>,
    build_id: Option<Vec<u8>>,
}

/// Lists the function sites of the objects loaded in this process, reading each file
/// once, and remembers which loads it has scanned.
#[derive(Default)]
pub struct Discoverer {
    cache: HashMap<FileKey, Analysis>,
    /// (file, bias) of every load scanned by the last call.
    scanned: HashSet<(FileKey, u64)>,
    /// Loads not backed by a file (vdso), already reported as skipped.
    unbacked: HashSet<u64>,
    loaded: Vec<LoadedObject>,
    skipped: Vec<SkippedObject>,
    /// The file of every load scanned by the last call, by (bias, loader's name), and
    /// the loader's unload counter then: while nothing was unloaded since, a load
    /// seen before is the same object and its file is not opened again (a `dlopen`
    /// reads only the new objects).
    known: HashMap<(u64, Vec<u8>), FileKey>,
    subs_seen: Option<u64>,
}

impl Discoverer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sites of every object loaded now, sorted by address. Objects that cannot be
    /// read (the vdso, a replaced or deleted file) are listed in [`Self::skipped`]; an
    /// error is returned only when the main executable cannot be read.
    pub fn discover_all(&mut self) -> Result<Vec<FunctionSite>, SitesError> {
        self.scanned.clear();
        self.unbacked.clear();
        self.scan(true)
    }

    /// The sites of the objects loaded since the previous call (after a `dlopen`), or of
    /// all of them on the first call. An object unloaded and loaded again is new again.
    /// [`Self::loaded`] and [`Self::skipped`] then describe only the new objects.
    pub fn discover_new(&mut self) -> Result<Vec<FunctionSite>, SitesError> {
        self.scan(false)
    }

    /// Forgets the load at `bias` (its object was unloaded): an object loaded there
    /// again is new to the next [`Self::discover_new`], even if no scan saw it absent.
    pub fn forget(&mut self, bias: u64) {
        self.scanned.retain(|(_, b)| *b != bias);
        self.unbacked.remove(&bias);
        self.known.retain(|(b, _), _| *b != bias);
    }

    /// The objects whose sites the last call returned.
    pub fn loaded(&self) -> &[LoadedObject] {
        &self.loaded
    }

    /// The objects the last call could not read, with the reason.
    pub fn skipped(&self) -> &[SkippedObject] {
        &self.skipped
    }

    fn scan(&mut self, all: bool) -> Result<Vec<FunctionSite>, SitesError> {
        self.loaded.clear();
        self.skipped.clear();
        // Nothing unloaded since the last call: loads seen then are the same objects.
        let subs = ffi::load_counts().1;
        let reuse = !all && self.subs_seen == Some(subs);
        let mut known = HashMap::new();
        let objects = ffi::loaded_objects();
        // Only the mappings of the objects to read are looked up.
        let mut probes: Vec<u64> = objects
            .iter()
            .filter(|o| {
                !(reuse
                    && (self.known.contains_key(&(o.bias, o.name.clone()))
                        || self.unbacked.contains(&o.bias)))
            })
            .filter_map(|o| o.loads.first().map(|l| o.bias.wrapping_add(l.vaddr)))
            .collect();
        let maps = if probes.is_empty() {
            Vec::new()
        } else {
            read_maps_containing(&mut probes).unwrap_or_default()
        };
        let mut current = HashSet::new();
        let mut current_unbacked = HashSet::new();
        let mut out = Vec::new();
        // The agent's own code, to tell its shared object (LD_PRELOADed) from the others.
        let own = Discoverer::new as fn() -> Self as usize as u64;
        for (i, info) in objects.into_iter().enumerate() {
            let is_main = i == 0;
            // When the agent is linked into the executable, its code is told apart by
            // name (the catalogue); the executable's own functions are analyzed.
            let relocation = if !is_main
                && info.loads.iter().any(|l| {
                    let start = info.bias.wrapping_add(l.vaddr);
                    own >= start && own - start < l.memsz
                }) {
                Relocation::OwnCode
            } else {
                Relocation::Analyze
            };
            let display = if info.name.is_empty() {
                "<main>".to_owned()
            } else {
                String::from_utf8_lossy(&info.name).into_owned()
            };
            let id = (info.bias, info.name.clone());
            if reuse && let Some(key) = self.known.get(&id) {
                current.insert((key.clone(), info.bias));
                known.insert(id, key.clone());
                continue;
            }
            if reuse && self.unbacked.contains(&info.bias) {
                current_unbacked.insert(info.bias);
                continue;
            }
            match self.scan_one(&info, &maps, relocation) {
                Ok(key) => {
                    known.insert(id, key.clone());
                    let load = (key, info.bias);
                    let fresh = all || !self.scanned.contains(&load);
                    current.insert(load.clone());
                    if !fresh {
                        continue;
                    }
                    let key = load.0;
                    let analysis = &self.cache[&key];
                    let mut sites = analysis.sites.as_ref().clone();
                    rebase(&mut sites, info.bias);
                    self.loaded.push(LoadedObject {
                        path: Arc::from(key.path.as_path()),
                        bias: info.bias,
                        dev: key.dev,
                        inode: key.inode,
                        functions: sites.len(),
                    });
                    out.extend(sites);
                }
                Err(error) if is_main => return Err(error),
                Err(error) => {
                    current_unbacked.insert(info.bias);
                    if all || !self.unbacked.contains(&info.bias) {
                        self.skipped.push(SkippedObject {
                            name: display,
                            bias: info.bias,
                            error,
                        });
                    }
                }
            }
        }
        self.scanned = current;
        self.unbacked = current_unbacked;
        self.known = known;
        self.subs_seen = Some(subs);
        out.sort_by_key(|s| s.address);
        Ok(out)
    }

    /// Reads (or finds in the cache) the file of one loaded object and checks that it is
    /// the one in memory. Returns the key of its cached analysis.
    fn scan_one(
        &mut self,
        info: &PhdrInfo,
        maps: &[Mapping],
        relocation: Relocation,
    ) -> Result<FileKey, SitesError> {
        let first = info
            .loads
            .first()
            .ok_or(SitesError::NotFileBacked { bias: info.bias })?;
        let probe = info.bias.wrapping_add(first.vaddr);
        let mapping = maps.iter().find(|m| m.start <= probe && probe < m.end);
        let (path, open_path) = match mapping {
            Some(m) => match &m.path {
                Some(p) if p.starts_with('/') => {
                    if let Some(stripped) = p.strip_suffix(" (deleted)") {
                        // The file is gone from its path: read the mapped file itself.
                        let via = PathBuf::from(format!(
                            "/proc/self/map_files/{:x}-{:x}",
                            m.start, m.end
                        ));
                        (PathBuf::from(stripped), via)
                    } else {
                        (PathBuf::from(p), PathBuf::from(p))
                    }
                }
                _ => return Err(SitesError::NotFileBacked { bias: info.bias }),
            },
            None if info.name.is_empty() => {
                let exe = crate::sys::procfs::exe()
                    .map_err(|e| SitesError::MainExecutable(format!("/proc/self/exe: {e}")))?;
                (exe, PathBuf::from("/proc/self/exe"))
            }
            None => {
                let p = PathBuf::from(std::ffi::OsStr::from_bytes(&info.name));
                (p.clone(), p)
            }
        };

        let io = |source| SitesError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::open(&open_path).map_err(|e| {
            if open_path.starts_with("/proc/self/map_files") {
                SitesError::Replaced {
                    path: path.clone(),
                    what: format!(
                        "the file was deleted and {} cannot be read: {e}",
                        open_path.display()
                    ),
                }
            } else {
                io(e)
            }
        })?;
        let meta = file.metadata().map_err(io)?;
        let key = FileKey {
            path: path.clone(),
            dev: meta.dev(),
            inode: meta.ino(),
        };
        if !self.cache.contains_key(&key) {
            let mut data = Vec::with_capacity(meta.len() as usize);
            file.read_to_end(&mut data).map_err(io)?;
            let sites = analyze_link_time(&data, &path, relocation)?;
            let (loads, build_id) = file_identity(&data, &path)?;
            self.cache.insert(
                key.clone(),
                Analysis {
                    sites: Arc::new(sites),
                    loads,
                    build_id,
                },
            );
        }
        let analysis = &self.cache[&key];
        if analysis.loads != info.loads {
            return Err(SitesError::Replaced {
                path,
                what: "its program headers differ from the loaded ones".into(),
            });
        }
        if let (Some(mem), Some(disk)) = (&info.build_id, &analysis.build_id)
            && mem != disk
        {
            return Err(SitesError::Replaced {
                path,
                what: format!("build id {} in memory, {} on disk", hex(mem), hex(disk)),
            });
        }
        Ok(key)
    }
}

/// The sites of every object loaded in this process now (see [`Discoverer::discover_all`]).
pub fn discover_all() -> Result<Vec<FunctionSite>, SitesError> {
    Discoverer::new().discover_all()
}

/// The `PT_LOAD` headers and GNU build id of an ELF file, to compare with memory.
fn file_identity(
    data: &[u8],
    path: &Path,
) -> Result<(Vec<LoadSegment>, Option<Vec<u8>>), SitesError> {
    let parse_err = |e: object::Error| SitesError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(parse_err)?;
    let endian = header.endian().map_err(parse_err)?;
    let loads = header
        .program_headers(endian, data)
        .map_err(parse_err)?
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| LoadSegment {
            vaddr: p.p_vaddr(endian),
            memsz: p.p_memsz(endian),
            offset: p.p_offset(endian),
            filesz: p.p_filesz(endian),
            flags: p.p_flags(endian).0,
        })
        .collect();
    let file = object::read::elf::ElfFile64::<Endianness>::parse(data).map_err(parse_err)?;
    let build_id = file.build_id().map_err(parse_err)?.map(<[u8]>::to_vec);
    Ok((loads, build_id))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
