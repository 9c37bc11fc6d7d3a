//! The tracer store: the active tracers (id, spec, owner, created time) and the next
//! tracer id, kept under the server's state directory so that a restarted server
//! knows every tracer again, including those for programs that have not started yet.
//! A pure I/O shell: what to save comes from [`Registry::saved_tracers`], what was
//! loaded goes to [`Registry::restore_tracers`].
//!
//! Format (`STATE_DIR/tracers.pb`): the 8-byte magic `PBTRACE1`, the payload length
//! (u64 LE), its CRC-32 (IEEE, u32 LE), then the payload, a protobuf [`StoreFile`].
//! The tracer count is small (one record per tracer), so every change rewrites the
//! whole file atomically: write `tracers.pb.tmp`, fsync it, rename it over
//! `tracers.pb`, fsync the directory. A file that is truncated, has a bad checksum or
//! does not decode is an error at startup: no tracer is dropped silently.
//!
//! The directory is created 0700 and must belong to the server's uid and not be
//! writable by others; an exclusive `flock` on `STATE_DIR/lock` keeps a second
//! server off the same store.
//!
//! [`Registry::saved_tracers`]: crate::registry::Registry::saved_tracers
//! [`Registry::restore_tracers`]: crate::registry::Registry::restore_tracers

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use patchbay_proto as pb;
use prost::Message;
use thiserror::Error;

use crate::registry::{SavedTracer, TracerId};

const MAGIC: &[u8; 8] = b"PBTRACE1";
const HEADER: usize = 8 + 8 + 4;
/// Version of the payload layout.
const FORMAT_VERSION: u32 = 1;
const FILE: &str = "tracers.pb";
const TMP: &str = "tracers.pb.tmp";
const LOCK: &str = "lock";

/// The payload of the store file.
#[derive(Clone, PartialEq, Message)]
pub struct StoreFile {
    #[prost(uint32, tag = "1")]
    pub format_version: u32,
    #[prost(uint64, tag = "2")]
    pub next_tracer_id: u64,
    #[prost(message, repeated, tag = "3")]
    pub tracers: Vec<StoredTracer>,
}

/// One active tracer.
#[derive(Clone, PartialEq, Message)]
pub struct StoredTracer {
    #[prost(uint64, tag = "1")]
    pub tracer_id: u64,
    #[prost(message, optional, tag = "2")]
    pub spec: Option<pb::TracerSpec>,
    #[prost(uint32, tag = "3")]
    pub owner_uid: u32,
    /// Milliseconds since the Unix epoch when the tracer was attached.
    #[prost(uint64, tag = "4")]
    pub created_unix_ms: u64,
    /// For a pid target: the start time of the traced process (0: any).
    #[prost(uint64, tag = "5")]
    pub pid_start_time: u64,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("no state directory: $HOME is not set; pass --state-dir DIR (or set XDG_STATE_HOME)")]
    NoDefault,
    #[error("state directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error(
        "state directory {path} belongs to uid {owner}, not to us (uid {me}): pass --state-dir DIR"
    )]
    NotOurs { path: PathBuf, owner: u32, me: u32 },
    #[error("state directory {path} is writable by others (mode {mode:o}): chmod 700 it")]
    Open { path: PathBuf, mode: u32 },
    #[error("state directory {path} is in use by another patchbayd (lock {path}/lock is held)")]
    Locked { path: PathBuf },
    #[error("reading the tracer store {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the tracer store {path} is corrupt: {reason}; no tracer was restored. Move the file aside to start without its tracers (they are then lost) or put back a good copy"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("writing the tracer store {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The default state directory: `/var/lib/patchbay` for root (a system service's
/// state, like other daemons'), else `$XDG_STATE_HOME/patchbay` (when set and
/// absolute), else `$HOME/.local/state/patchbay` (the XDG base-directory default).
pub fn default_state_dir() -> Result<PathBuf, StoreError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/patchbay"));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from)
        && d.is_absolute()
    {
        return Ok(d.join("patchbay"));
    }
    match std::env::var_os("HOME").map(PathBuf::from) {
        Some(h) if h.is_absolute() => Ok(h.join(".local/state/patchbay")),
        _ => Err(StoreError::NoDefault),
    }
}

/// An open store (its directory locked for this process).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Created times of the tracers saved last, by id.
    created: BTreeMap<TracerId, u64>,
    _lock: Flock<File>,
}

/// What a previous run saved.
#[derive(Debug, Default)]
pub struct Loaded {
    pub tracers: Vec<SavedTracer>,
    pub next_tracer_id: TracerId,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Creates `dir` 0700 when missing; refuses one we do not own or others may write.
fn prepare_dir(dir: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let md = std::fs::metadata(dir).map_err(io)?;
    if !md.is_dir() {
        return Err(io(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(StoreError::NotOurs {
            path: dir.to_path_buf(),
            owner: md.uid(),
            me,
        });
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(StoreError::Open {
            path: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Decodes a store file's bytes (`path` only names it in errors).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Loaded, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if !MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
        return Err(corrupt(
            "it does not start with PBTRACE1 (not a patchbay tracer store)".into(),
        ));
    }
    if bytes.len() < HEADER {
        return Err(corrupt(format!(
            "{} bytes, shorter than the {HEADER}-byte header",
            bytes.len()
        )));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(corrupt(format!(
            "the header announces {len} payload bytes, the file holds {}",
            payload.len()
        )));
    }
    if crc32(payload) != crc {
        return Err(corrupt(format!(
            "checksum mismatch (stored {crc:#010x}, computed {:#010x})",
            crc32(payload)
        )));
    }
    let file = StoreFile::decode(payload).map_err(|e| corrupt(format!("undecodable: {e}")))?;
    if file.format_version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {} (this patchbayd reads version {FORMAT_VERSION})",
            file.format_version
        )));
    }
    let mut ids = BTreeSet::new();
    let mut tracers = Vec::with_capacity(file.tracers.len());
    for t in file.tracers {
        if t.tracer_id == 0 || !ids.insert(t.tracer_id) {
            return Err(corrupt(format!(
                "tracer id {} is zero or appears twice",
                t.tracer_id
            )));
        }
        let spec = t
            .spec
            .ok_or_else(|| corrupt(format!("tracer {} has no spec", t.tracer_id)))?;
        tracers.push(SavedTracer {
            id: t.tracer_id,
            spec,
            owner_uid: t.owner_uid,
            pid_start_time: t.pid_start_time,
        });
    }
    Ok(Loaded {
        tracers,
        next_tracer_id: file.next_tracer_id,
    })
}

impl Store {
    /// Opens (creating if needed) the store under `dir` and loads what it holds.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        prepare_dir(dir)?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StoreError::Dir {
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                StoreError::Locked {
                    path: dir.to_path_buf(),
                }
            } else {
                StoreError::Dir {
                    path: lock_path.clone(),
                    source: e.into(),
                }
            }
        })?;
        let path = dir.join(FILE);
        let (loaded, created) = match std::fs::read(&path) {
            Ok(bytes) => {
                let loaded = decode(&path, &bytes)?;
                // decode() checked the payload: read the created times again.
                let file = StoreFile::decode(&bytes[HEADER..]).expect("decoded above");
                let created = file
                    .tracers
                    .iter()
                    .map(|t| (t.tracer_id, t.created_unix_ms))
                    .collect();
                (loaded, created)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Loaded::default(), BTreeMap::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok((
            Store {
                dir: dir.to_path_buf(),
                created,
                _lock: lock,
            },
            loaded,
        ))
    }

    /// The store file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Ids of the tracers saved last.
    pub fn saved_ids(&self) -> BTreeSet<TracerId> {
        self.created.keys().copied().collect()
    }

    /// Replaces the stored tracers with `tracers`, durably (see the module doc); on
    /// error the previous file is intact.
    pub fn save(
        &mut self,
        tracers: &[SavedTracer],
        next_tracer_id: TracerId,
    ) -> Result<(), StoreError> {
        let now = unix_ms();
        let created: BTreeMap<TracerId, u64> = tracers
            .iter()
            .map(|t| (t.id, self.created.get(&t.id).copied().unwrap_or(now)))
            .collect();
        let file = StoreFile {
            format_version: FORMAT_VERSION,
            next_tracer_id,
            tracers: tracers
                .iter()
                .map(|t| StoredTracer {
                    tracer_id: t.id,
                    spec: Some(t.spec.clone()),
                    owner_uid: t.owner_uid,
                    created_unix_ms: created[&t.id],
                    pid_start_time: t.pid_start_time,
                })
                .collect(),
        };
        let payload = file.encode_to_vec();
        let mut bytes = Vec::with_capacity(HEADER + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let tmp = self.dir.join(TMP);
        let path = self.path();
        let write = |p: &Path| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(p, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write(&tmp).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            StoreError::Write {
                path: path.clone(),
                source,
            }
        })?;
        self.created = created;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pattern: &str) -> pb::TracerSpec {
        pb::TracerSpec {
            target: Some(pb::Target {
                target: Some(pb::target::Target::Exe("/bin/x".into())),
            }),
            pattern: pattern.into(),
            callback: Some(pb::CallbackSpec {
                kind: pb::CallbackKind::Count as i32,
                ..Default::default()
            }),
            name: "n".into(),
        }
    }

    fn saved(id: u64, pattern: &str) -> SavedTracer {
        SavedTracer {
            id,
            spec: spec(pattern),
            owner_uid: 1000,
            pid_start_time: 0,
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn save_and_reopen_keeps_tracers_ids_and_created_times() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (mut store, loaded) = Store::open(&state).unwrap();
        assert!(loaded.tracers.is_empty());
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        store.save(&[saved(3, "a*"), saved(7, "b*")], 9).unwrap();
        let created = store.created.clone();
        store.save(&[saved(7, "b*")], 10).unwrap();
        assert_eq!(store.created[&7], created[&7], "created time kept");
        drop(store);
        let (store, loaded) = Store::open(&state).unwrap();
        assert_eq!(loaded.tracers, vec![saved(7, "b*")]);
        assert_eq!(loaded.next_tracer_id, 10);
        assert_eq!(store.created[&7], created[&7]);
        assert!(!state.join(TMP).exists());
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, _) = Store::open(dir.path()).unwrap();
        let e = Store::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    }

    #[test]
    fn every_damage_is_a_precise_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path()).unwrap();
        store.save(&[saved(1, "a*"), saved(2, "b*")], 3).unwrap();
        let path = store.path();
        drop(store);
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], want: &str| {
            std::fs::write(&path, bytes).unwrap();
            let e = Store::open(dir.path()).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, StoreError::Corrupt { .. }) && msg.contains(want),
                "{msg}"
            );
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        };
        // Truncated at every length (a truncation at a record boundary would decode).
        for n in 0..good.len() {
            let e = decode(&path, &good[..n]).unwrap_err();
            assert!(matches!(e, StoreError::Corrupt { .. }), "{n}: {e}");
        }
        check(&good[..5], "shorter than");
        check(&good[..good.len() - 3], "payload bytes");
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        check(&flipped, "checksum");
        let mut magic = good.clone();
        magic[0] = b'X';
        check(&magic, "PBTRACE1");
        // A well-framed payload that is not a store file.
        let junk = [0xffu8; 12];
        let mut framed = MAGIC.to_vec();
        framed.extend_from_slice(&(junk.len() as u64).to_le_bytes());
        framed.extend_from_slice(&crc32(&junk).to_le_bytes());
        framed.extend_from_slice(&junk);
        check(&framed, "undecodable");
        std::fs::write(&path, &good).unwrap();
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.tracers.len(), 2);
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("open");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Store::open(&state).unwrap_err();
        assert!(matches!(e, StoreError::Open { .. }), "{e}");
    }
}
