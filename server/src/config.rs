//! `patchbayd`'s configuration: every server option comes from, in this order of
//! precedence, a command-line flag, an environment variable, the configuration file, or
//! the built-in default.
//!
//! - flags: `--socket`, `--socket-mode`, ... (see `patchbayd --help`);
//! - environment: `PATCHBAYD_<FLAG>` in upper snake case (`PATCHBAYD_SOCKET_MODE=666`),
//!   except the socket, which is `PATCHBAY_SOCKET` (shared with agents and clients), and
//!   the log filter, `PATCHBAYD_LOG`, else `RUST_LOG`;
//! - file: TOML, one key per flag with the flag's name (`socket-mode = "666"`), at
//!   `--config FILE`, else `$PATCHBAYD_CONFIG`, else `/etc/patchbay/patchbayd.toml` for
//!   root and `$XDG_CONFIG_HOME/patchbay/patchbayd.toml` (or
//!   `~/.config/patchbay/patchbayd.toml`) for other users. A missing default file is no
//!   error; a missing named file, a syntax error, an unknown key or a bad value is, and
//!   names the file and the line.
//!
//! Everything here is pure (the inputs are passed in) except [`Layer::from_process_env`]
//! and [`default_file`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::registry::Settings;

// `patchbayd`'s command line (also rendered as its man page by `patchbay man`).

/// The patchbay server: agents, tracers, trampolines and grace periods.
///
/// Every option can also be set in the environment (PATCHBAYD_<OPTION>, e.g.
/// PATCHBAYD_SOCKET_MODE; the socket is PATCHBAY_SOCKET, the log filter PATCHBAYD_LOG or
/// RUST_LOG) or in the configuration file (the option's name as the key, e.g.
/// `socket-mode = "666"`); a flag wins over the environment, which wins over the file.
/// Under systemd, the socket unit's listening socket is used (socket activation). SIGHUP
/// reloads the configuration file; SIGTERM and SIGINT stop the server (agents keep their
/// trampolines and reconnect to the next server).
#[derive(clap::Parser, Debug)]
#[command(name = "patchbayd", version)]
pub struct Args {
    /// Configuration file [default: /etc/patchbay/patchbayd.toml for root, else
    /// $XDG_CONFIG_HOME/patchbay/patchbayd.toml, else ~/.config/patchbay/patchbayd.toml;
    /// env: PATCHBAYD_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read no configuration file
    #[arg(long, conflicts_with = "config")]
    pub no_config: bool,
    /// Unix socket to listen on, unless systemd passes one [default: $PATCHBAY_SOCKET,
    /// else $XDG_RUNTIME_DIR/patchbay/patchbayd.sock, else /tmp/patchbay-$UID/patchbayd.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Mode of the socket file, octal (666 lets other users' agents and clients in;
    /// SO_PEERCRED still limits each to its own uid) [default: 600]
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<Mode>,
    /// Also listen on TCP, e.g. tcp://127.0.0.1:7420 (Control only; needs --token-file)
    #[arg(long, value_name = "tcp://HOST:PORT")]
    pub listen: Option<String>,
    /// File holding the token TCP clients must present
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A thread holding up a grace period this long is reported as a stall [default: 1000]
    #[arg(long, value_name = "MS")]
    pub stall_threshold_ms: Option<u32>,
    /// Real-time signal agents use to observe running threads (0: agent default)
    /// [default: 0]
    #[arg(long, value_name = "SIGNAL")]
    pub qs_signal: Option<u32>,
    /// Do not ask agents to expedite grace periods (they then rely on explicit and
    /// periodic quiescent states)
    #[arg(long)]
    pub no_expedite: bool,
    /// Directory of the tracer store (tracer specs survive restarts there), created
    /// 0700 [default: /var/lib/patchbay for root, else $XDG_STATE_HOME/patchbay, else
    /// ~/.local/state/patchbay]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax) [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
    /// TEST-ONLY FAULT INJECTION: authorize freeing retired trampolines without waiting
    /// for their grace period (frees memory threads may still execute). Exists so the
    /// torture test can prove it catches that bug; never use it otherwise.
    #[arg(long, hide = true)]
    pub fault_skip_grace_period: bool,
}

impl Args {
    /// The flags' layer of options.
    pub fn layer(&self) -> Layer {
        Layer {
            socket: self.socket.clone(),
            socket_mode: self.socket_mode,
            listen: self.listen.clone(),
            token_file: self.token_file.clone(),
            stall_threshold_ms: self.stall_threshold_ms,
            qs_signal: self.qs_signal,
            no_expedite: self.no_expedite.then_some(true),
            state_dir: self.state_dir.clone(),
            log: self.log.clone(),
        }
    }
}

/// Built-in defaults.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
pub const DEFAULT_STALL_THRESHOLD_MS: u32 = 1000;
pub const DEFAULT_LOG: &str = "info";
/// The system-wide configuration file (root's server).
pub const SYSTEM_FILE: &str = "/etc/patchbay/patchbayd.toml";
/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "PATCHBAYD_CONFIG";

/// A file mode, written in octal (`"600"`, `"0666"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode(pub u32);

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        u32::from_str_radix(s, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .map(Mode)
            .ok_or_else(|| format!("'{s}' is not an octal file mode such as 600"))
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One source of options: every field optional (unset: the next source decides).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Layer {
    pub socket: Option<PathBuf>,
    pub socket_mode: Option<Mode>,
    pub listen: Option<String>,
    pub token_file: Option<PathBuf>,
    pub stall_threshold_ms: Option<u32>,
    pub qs_signal: Option<u32>,
    pub no_expedite: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub log: Option<String>,
}

/// A configuration that cannot be used; says where the bad value came from.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
    #[error("cannot read the configuration file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// A syntax error, unknown key or bad value; `message` names the line and column.
    #[error("configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Layer {
    /// Each field of `self`, else of `lower`.
    pub fn or(self, lower: Layer) -> Layer {
        Layer {
            socket: self.socket.or(lower.socket),
            socket_mode: self.socket_mode.or(lower.socket_mode),
            listen: self.listen.or(lower.listen),
            token_file: self.token_file.or(lower.token_file),
            stall_threshold_ms: self.stall_threshold_ms.or(lower.stall_threshold_ms),
            qs_signal: self.qs_signal.or(lower.qs_signal),
            no_expedite: self.no_expedite.or(lower.no_expedite),
            state_dir: self.state_dir.or(lower.state_dir),
            log: self.log.or(lower.log),
        }
    }

    /// The environment's layer from `(name, value)` pairs (empty values count as unset).
    pub fn from_env(
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Layer, ConfigError> {
        let mut layer = Layer::default();
        let mut rust_log = None;
        for (name, value) in vars {
            let (Some(name), false) = (name.to_str(), value.is_empty()) else {
                continue;
            };
            let text = || {
                value
                    .to_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ConfigError::Env {
                        name: name.to_owned(),
                        value: value.to_string_lossy().into_owned(),
                        reason: "not valid UTF-8".into(),
                    })
            };
            let bad = |reason: String| ConfigError::Env {
                name: name.to_owned(),
                value: value.to_string_lossy().into_owned(),
                reason,
            };
            let number = |what: &str| -> Result<u32, ConfigError> {
                text()?
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| bad(format!("expected {what}")))
            };
            match name {
                patchbay_proto::socket::SOCKET_ENV => layer.socket = Some(PathBuf::from(&value)),
                "PATCHBAYD_SOCKET_MODE" => {
                    layer.socket_mode = Some(text()?.trim().parse().map_err(bad)?)
                }
                "PATCHBAYD_LISTEN" => layer.listen = Some(text()?),
                "PATCHBAYD_TOKEN_FILE" => layer.token_file = Some(PathBuf::from(&value)),
                "PATCHBAYD_STALL_THRESHOLD_MS" => {
                    layer.stall_threshold_ms = Some(number("a number of milliseconds")?)
                }
                "PATCHBAYD_QS_SIGNAL" => layer.qs_signal = Some(number("a signal number")?),
                "PATCHBAYD_NO_EXPEDITE" => {
                    layer.no_expedite = Some(match text()?.trim() {
                        "1" | "true" | "yes" => true,
                        "0" | "false" | "no" => false,
                        _ => return Err(bad("expected true or false (1/0, yes/no)".into())),
                    })
                }
                "PATCHBAYD_STATE_DIR" => layer.state_dir = Some(PathBuf::from(&value)),
                "PATCHBAYD_LOG" => layer.log = Some(text()?),
                "RUST_LOG" => rust_log = Some(text()?),
                _ => {}
            }
        }
        layer.log = layer.log.or(rust_log);
        Ok(layer)
    }

    /// The environment's layer of this process.
    pub fn from_process_env() -> Result<Layer, ConfigError> {
        Layer::from_env(std::env::vars_os())
    }

    /// Parses a configuration file's text (`path` only names it in errors).
    pub fn from_toml(path: &Path, text: &str) -> Result<Layer, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })
    }
}

/// Which configuration file to read: `--config` (`flag`), else `$PATCHBAYD_CONFIG`
/// (`env`); both must exist. Else the default file (`default`), read only if it exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileChoice {
    /// Named by `--config` or `$PATCHBAYD_CONFIG`: must exist.
    Named(PathBuf),
    /// The default location: read only if it exists.
    Default(PathBuf),
    /// `--no-config`, or no default location (no home directory).
    None,
}

impl FileChoice {
    pub fn pick(
        flag: Option<PathBuf>,
        no_config: bool,
        env: Option<OsString>,
        default: Option<PathBuf>,
    ) -> FileChoice {
        if no_config {
            return FileChoice::None;
        }
        match (flag, env.filter(|e| !e.is_empty())) {
            (Some(path), _) => FileChoice::Named(path),
            (None, Some(path)) => FileChoice::Named(PathBuf::from(path)),
            (None, None) => default.map_or(FileChoice::None, FileChoice::Default),
        }
    }

    /// The path that was read, if any, and its layer.
    pub fn load(&self) -> Result<(Option<PathBuf>, Layer), ConfigError> {
        let (path, required) = match self {
            FileChoice::Named(p) => (p, true),
            FileChoice::Default(p) => (p, false),
            FileChoice::None => return Ok((None, Layer::default())),
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((Some(path.clone()), Layer::from_toml(path, &text)?)),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                Ok((None, Layer::default()))
            }
            Err(e) => Err(ConfigError::Read {
                path: path.clone(),
                reason: e.to_string(),
            }),
        }
    }
}

/// The default configuration file of a server run by `uid`: [`SYSTEM_FILE`] for root,
/// else `$XDG_CONFIG_HOME/patchbay/patchbayd.toml`, else
/// `$HOME/.config/patchbay/patchbayd.toml`.
pub fn default_file_from(
    uid: u32,
    config_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    if uid == 0 {
        return Some(PathBuf::from(SYSTEM_FILE));
    }
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    let base = absolute(config_home).or_else(|| absolute(home).map(|h| h.join(".config")))?;
    Some(base.join("patchbay").join("patchbayd.toml"))
}

/// [`default_file_from`] for this process.
pub fn default_file() -> Option<PathBuf> {
    default_file_from(
        nix::unistd::getuid().as_raw(),
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
}

/// The options in force, every source merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `None`: the default socket (`patchbay_proto::socket::default_socket_path`).
    pub socket: Option<PathBuf>,
    pub socket_mode: u32,
    /// TCP listener `HOST:PORT` (from `tcp://HOST:PORT`) and the token file it needs.
    pub tcp: Option<(String, PathBuf)>,
    pub stall_threshold_ms: u32,
    pub qs_signal: u32,
    pub expedite: bool,
    /// `None`: the default state directory (`store::default_state_dir`).
    pub state_dir: Option<PathBuf>,
    pub log: String,
}

/// Merges the sources: `flags` over `env` over `file` over the defaults; checks what
/// only the combination can tell.
pub fn resolve(flags: Layer, env: Layer, file: Layer) -> Result<Resolved, ConfigError> {
    let l = flags.or(env).or(file);
    let tcp = match (l.listen, l.token_file) {
        (Some(addr), Some(token)) => {
            let Some(hostport) = addr.strip_prefix("tcp://") else {
                return Err(ConfigError::Invalid(format!(
                    "listen = {addr:?}: expected tcp://HOST:PORT"
                )));
            };
            Some((hostport.to_owned(), token))
        }
        (Some(_), None) => {
            return Err(ConfigError::Invalid(
                "listen needs token-file: TCP clients must present a token \
                 (--token-file, PATCHBAYD_TOKEN_FILE or token-file in the configuration file)"
                    .into(),
            ));
        }
        (None, _) => None,
    };
    if let Some(signal) = l.qs_signal
        && signal != 0
        && !(libc_sigrtmin()..=libc_sigrtmax()).contains(&signal)
    {
        return Err(ConfigError::Invalid(format!(
            "qs-signal = {signal}: expected 0 (the agent's default) or a real-time signal \
             number from {} to {}",
            libc_sigrtmin(),
            libc_sigrtmax()
        )));
    }
    Ok(Resolved {
        socket: l.socket,
        socket_mode: l.socket_mode.map_or(DEFAULT_SOCKET_MODE, |m| m.0),
        tcp,
        stall_threshold_ms: l.stall_threshold_ms.unwrap_or(DEFAULT_STALL_THRESHOLD_MS),
        qs_signal: l.qs_signal.unwrap_or(0),
        expedite: !l.no_expedite.unwrap_or(false),
        state_dir: l.state_dir,
        log: l.log.unwrap_or_else(|| DEFAULT_LOG.to_owned()),
    })
}

// glibc reserves the first real-time signals for itself: SIGRTMIN is 34 on Linux
// x86_64 glibc; SIGRTMAX is 64.
fn libc_sigrtmin() -> u32 {
    34
}
fn libc_sigrtmax() -> u32 {
    64
}

impl Resolved {
    /// The registry's settings (`fault_skip_grace_period` is a flag only, never
    /// configured).
    pub fn settings(&self, fault_skip_grace_period: bool) -> Settings {
        Settings {
            stall_threshold: Duration::from_millis(self.stall_threshold_ms as u64),
            expedite: self.expedite,
            agent: patchbay_proto::AgentSettings {
                qs_signal: self.qs_signal,
                stall_threshold_ms: self.stall_threshold_ms,
                flush_interval_ms: 100,
            },
            fault_skip_grace_period,
        }
    }

    /// What a reload (SIGHUP) can apply to a running server: the log filter and the
    /// settings (stall threshold, expedite; the agent settings reach agents that connect
    /// afterwards). Returns the names of the options that changed in `new` but need a
    /// restart (the listeners and the state directory).
    pub fn needs_restart(&self, new: &Resolved) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.socket != new.socket {
            changed.push("socket");
        }
        if self.socket_mode != new.socket_mode {
            changed.push("socket-mode");
        }
        if self.tcp != new.tcp {
            changed.push("listen/token-file");
        }
        if self.state_dir != new.state_dir {
            changed.push("state-dir");
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Layer, ConfigError> {
        Layer::from_env(
            pairs
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
    }

    fn file(text: &str) -> Result<Layer, ConfigError> {
        Layer::from_toml(Path::new("/etc/patchbay/patchbayd.toml"), text)
    }

    #[test]
    fn defaults() {
        let r = resolve(Layer::default(), Layer::default(), Layer::default()).unwrap();
        assert_eq!(
            r,
            Resolved {
                socket: None,
                socket_mode: 0o600,
                tcp: None,
                stall_threshold_ms: 1000,
                qs_signal: 0,
                expedite: true,
                state_dir: None,
                log: "info".into(),
            }
        );
    }

    #[test]
    fn flags_over_env_over_file_over_defaults() {
        let f = file(
            "socket = \"/file.sock\"\nsocket-mode = \"644\"\nstall-threshold-ms = 300\n\
             qs-signal = 40\nno-expedite = true\nstate-dir = \"/file-state\"\nlog = \"warn\"\n\
             listen = \"tcp://127.0.0.1:7420\"\ntoken-file = \"/file-token\"\n",
        )
        .unwrap();
        let e = env(&[
            ("PATCHBAY_SOCKET", "/env.sock"),
            ("PATCHBAYD_STALL_THRESHOLD_MS", "200"),
            ("PATCHBAYD_NO_EXPEDITE", "false"),
            ("PATCHBAYD_TOKEN_FILE", "/env-token"),
            ("RUST_LOG", "debug"),
            ("UNRELATED", "x"),
        ])
        .unwrap();
        let flags = Layer {
            stall_threshold_ms: Some(100),
            ..Layer::default()
        };
        let r = resolve(flags, e.clone(), f.clone()).unwrap();
        assert_eq!(r.stall_threshold_ms, 100, "flag over env and file");
        assert_eq!(
            r.socket.as_deref(),
            Some(Path::new("/env.sock")),
            "env over file"
        );
        assert!(r.expedite, "env (false) over file (true)");
        assert_eq!(r.log, "debug", "RUST_LOG over file");
        assert_eq!(r.socket_mode, 0o644, "file over default");
        assert_eq!(r.qs_signal, 40, "file over default");
        assert_eq!(r.state_dir.as_deref(), Some(Path::new("/file-state")));
        assert_eq!(
            r.tcp,
            Some(("127.0.0.1:7420".into(), PathBuf::from("/env-token"))),
            "listen from the file, token file from the env"
        );
        // Without the flag, env decides; without env, the file.
        assert_eq!(
            resolve(Layer::default(), e, f.clone())
                .unwrap()
                .stall_threshold_ms,
            200
        );
        assert_eq!(
            resolve(Layer::default(), Layer::default(), f)
                .unwrap()
                .stall_threshold_ms,
            300
        );
        // PATCHBAYD_LOG wins over RUST_LOG, in any order.
        let e = env(&[("PATCHBAYD_LOG", "trace"), ("RUST_LOG", "debug")]).unwrap();
        assert_eq!(e.log.as_deref(), Some("trace"));
        let e = env(&[("RUST_LOG", "debug"), ("PATCHBAYD_LOG", "trace")]).unwrap();
        assert_eq!(e.log.as_deref(), Some("trace"));
        // Empty variables are unset.
        assert_eq!(
            env(&[("PATCHBAY_SOCKET", ""), ("PATCHBAYD_QS_SIGNAL", "")]).unwrap(),
            Layer::default()
        );
    }

    #[test]
    fn bad_files_name_the_line() {
        let err = file("socket-mode = \"600\"\nstall-threshold = 5\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("configuration file /etc/patchbay/patchbayd.toml: "),
            "{text}"
        );
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("unknown field `stall-threshold`"), "{text}");

        let text = file("\n\nsocket-mode = \"999\"\n").unwrap_err().to_string();
        assert!(text.contains("line 3"), "{text}");
        assert!(
            text.contains("'999' is not an octal file mode such as 600"),
            "{text}"
        );

        let text = file("stall-threshold-ms = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(text.contains("line 1"), "{text}");

        let text = file("log = \"info\"\nlog = \"debug\"\n")
            .unwrap_err()
            .to_string();
        assert!(text.contains("line 2"), "{text}");

        let text = file("socket = \n").unwrap_err().to_string();
        assert!(text.contains("line 1"), "{text}");
    }

    #[test]
    fn bad_env_and_combinations_are_precise() {
        assert_eq!(
            env(&[("PATCHBAYD_STALL_THRESHOLD_MS", "1s")])
                .unwrap_err()
                .to_string(),
            "environment variable PATCHBAYD_STALL_THRESHOLD_MS=\"1s\": expected a number of milliseconds"
        );
        assert_eq!(
            env(&[("PATCHBAYD_SOCKET_MODE", "8")])
                .unwrap_err()
                .to_string(),
            "environment variable PATCHBAYD_SOCKET_MODE=\"8\": '8' is not an octal file mode such as 600"
        );
        assert!(env(&[("PATCHBAYD_NO_EXPEDITE", "maybe")]).is_err());
        let listen_only = Layer {
            listen: Some("tcp://127.0.0.1:1".into()),
            ..Layer::default()
        };
        let err = resolve(listen_only, Layer::default(), Layer::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("listen needs token-file"),
            "{err}"
        );
        let no_scheme = Layer {
            listen: Some("127.0.0.1:1".into()),
            token_file: Some("/t".into()),
            ..Layer::default()
        };
        let err = resolve(no_scheme, Layer::default(), Layer::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "listen = \"127.0.0.1:1\": expected tcp://HOST:PORT"
        );
        let signal = file("qs-signal = 9\n").unwrap();
        let err = resolve(Layer::default(), Layer::default(), signal).unwrap_err();
        assert!(
            err.to_string().starts_with("qs-signal = 9: expected 0"),
            "{err}"
        );
    }

    #[test]
    fn which_file() {
        let named = |p: &str| FileChoice::Named(PathBuf::from(p));
        let d = Some(PathBuf::from("/etc/patchbay/patchbayd.toml"));
        assert_eq!(
            FileChoice::pick(Some("/f".into()), false, Some("/e".into()), d.clone()),
            named("/f")
        );
        assert_eq!(
            FileChoice::pick(None, false, Some("/e".into()), d.clone()),
            named("/e")
        );
        assert_eq!(
            FileChoice::pick(None, false, Some("".into()), d.clone()),
            FileChoice::Default(d.clone().unwrap())
        );
        assert_eq!(
            FileChoice::pick(Some("/f".into()), true, None, d.clone()),
            FileChoice::None
        );
        assert_eq!(FileChoice::pick(None, false, None, None), FileChoice::None);

        assert_eq!(
            default_file_from(0, None, None),
            Some(PathBuf::from(SYSTEM_FILE))
        );
        assert_eq!(
            default_file_from(1000, Some("/x/cfg".into()), Some("/home/u".into())),
            Some(PathBuf::from("/x/cfg/patchbay/patchbayd.toml"))
        );
        assert_eq!(
            default_file_from(1000, Some("relative".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.config/patchbay/patchbayd.toml"))
        );
        assert_eq!(default_file_from(1000, None, None), None);
    }

    #[test]
    fn loading_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        // A missing default file is no error; a missing named one is.
        assert_eq!(
            FileChoice::Default(missing.clone()).load().unwrap(),
            (None, Layer::default())
        );
        let err = FileChoice::Named(missing.clone()).load().unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "cannot read the configuration file {}: ",
                missing.display()
            )),
            "{err}"
        );
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "# comment\nqs-signal = 40\n").unwrap();
        let (read, layer) = FileChoice::Default(good.clone()).load().unwrap();
        assert_eq!(read, Some(good));
        assert_eq!(layer.qs_signal, Some(40));
    }

    #[test]
    fn the_example_file_parses_to_the_defaults() {
        // server/systemd/patchbayd.toml, installed as /etc/patchbay/patchbayd.toml: every
        // key commented out (`#key = value`; prose is `# ...`), so that it documents the
        // defaults and changes nothing.
        let text = include_str!("../systemd/patchbayd.toml");
        assert_eq!(file(text).unwrap(), Layer::default());
        // Uncommented, every documented key is accepted and equals the default.
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase()))
            .map(|l| format!("{l}\n"))
            .collect();
        let all = file(&uncommented).unwrap();
        assert!(all.socket_mode.is_some() && all.stall_threshold_ms.is_some() && all.log.is_some());
        let r = resolve(Layer::default(), Layer::default(), all).unwrap();
        assert_eq!(r.socket_mode, DEFAULT_SOCKET_MODE);
        assert_eq!(r.stall_threshold_ms, DEFAULT_STALL_THRESHOLD_MS);
        assert_eq!(r.log, DEFAULT_LOG);
        assert!(r.expedite);
    }

    #[test]
    fn what_a_reload_cannot_change() {
        let a = resolve(Layer::default(), Layer::default(), Layer::default()).unwrap();
        let mut b = a.clone();
        b.log = "debug".into();
        b.stall_threshold_ms = 5;
        assert!(a.needs_restart(&b).is_empty());
        b.socket_mode = 0o666;
        b.state_dir = Some("/x".into());
        assert_eq!(a.needs_restart(&b), ["socket-mode", "state-dir"]);
    }
}
