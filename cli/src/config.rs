//! `rtrs serve --config FILE`: the server's settings in TOML, the same as
//! its flags; a flag given on the command line overrides the file's value
//! (a list flag replaces the file's list). Unknown keys are refused, named.
//!
//! ```text
//!  defaults <- FILE (serde, deny_unknown_fields) <- flags  => Settings (range-checked once)
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The file's layout (scripts/deploy/rtrs.toml is an example).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Poll cores.
    pub cores: Option<Vec<usize>>,
    pub control_cpu: Option<usize>,
    /// "normal" or "idle" (the poll cores' scheduling policy).
    pub poll_sched: Option<String>,
    pub queue_depth: Option<u64>,
    pub chunk_size: Option<Size>,
    pub always_invalidate: Option<bool>,
    pub hb_interval_ms: Option<u64>,
    pub hb_missed: Option<u64>,
    /// The Prometheus endpoint (ADDR:PORT).
    pub metrics: Option<String>,
    /// The control socket's path.
    pub ctl: Option<PathBuf>,
    /// "text" or "json".
    pub log_format: Option<String>,
    /// Hugepage memory this server takes at most ("2G").
    pub hugepage_limit: Option<Size>,
    #[serde(default)]
    pub listen: Vec<Listener>,
    #[serde(default)]
    pub export: Vec<ExportCfg>,
    #[serde(default)]
    pub access: AccessCfg,
    #[serde(default)]
    pub limits: LimitsCfg,
}

/// A byte size: a number or a string with K, M, G or T.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self, key: &str) -> Result<u64, String> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(s) => crate::parse_bytes(s).map_err(|e| format!("{key}: {e}")),
        }
    }
}

/// A listener: `address = "tcp:HOST:PORT"` (or shm:NAME, rdma:HOST:PORT).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: String,
}

/// An export: as `--export NAME=DEVICE[,ro][,allow=..][,allow-key=..]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportCfg {
    pub name: String,
    /// "ram:SIZE" or "file:PATH".
    pub device: String,
    #[serde(default)]
    pub ro: bool,
    /// Session names that may open it (default: any).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Key ids that may open it.
    #[serde(default)]
    pub allow_key: Vec<String>,
}

impl ExportCfg {
    /// The `--export` spec.
    pub fn spec(&self) -> String {
        let mut s = format!("{}={}", self.name, self.device);
        if self.ro {
            s.push_str(",ro");
        }
        if !self.allow.is_empty() {
            s.push_str(&format!(",allow={}", self.allow.join("|")));
        }
        if !self.allow_key.is_empty() {
            s.push_str(&format!(",allow-key={}", self.allow_key.join("|")));
        }
        s
    }
}

/// Who may connect (all listeners).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessCfg {
    #[serde(default)]
    pub allow: Vec<String>,
    pub auth_key: Option<PathBuf>,
    pub insecure: Option<bool>,
}

/// Admission limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsCfg {
    pub max_sessions: Option<u64>,
    pub max_sessions_per_host: Option<u64>,
    pub max_paths_per_session: Option<u64>,
    pub max_handshakes_per_host: Option<u64>,
    pub handshake_timeout: Option<u64>,
    pub memory_budget: Option<Size>,
    pub max_registrations: Option<u64>,
    pub prealloc_sessions: Option<u64>,
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<FileConfig, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("--config {}: {e}", path.display()))
}

/// Parses a config text (an unknown key is named in the error).
pub fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
}

/// Everything `rtrs serve` runs with, resolved and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub listen: Vec<rtrs_fabric::Address>,
    pub exports: Vec<String>,
    pub cores: Vec<usize>,
    pub control_cpu: Option<usize>,
    pub poll_sched: pollers::CoreSched,
    pub metrics: Option<std::net::SocketAddr>,
    pub ctl: Option<PathBuf>,
    pub always_invalidate: bool,
    pub queue_depth: u16,
    pub chunk_size: u32,
    pub hb_interval_ms: u64,
    pub hb_missed: u32,
    pub access: Access,
}

/// Who may connect and how much they may take, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Access {
    pub allow: Vec<ipnet::IpNet>,
    pub auth_key: Option<PathBuf>,
    pub insecure: bool,
    pub max_sessions: u64,
    pub max_sessions_per_host: u64,
    pub max_paths_per_session: u64,
    pub max_handshakes_per_host: u64,
    pub handshake_timeout: u64,
    pub memory_budget: Option<u64>,
    pub hugepage_limit: Option<u64>,
    pub max_registrations: Option<u32>,
    pub prealloc_sessions: u64,
}

fn in_range(key: &str, v: u64, lo: u64, hi: u64) -> Result<u64, String> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{key} = {v} is out of range {lo}..={hi}"))
    }
}

/// The flag if given, else the file's value, else the default.
fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

/// defaults <- file <- flags.
pub fn resolve(a: &crate::ServeArgs, f: &FileConfig) -> Result<Settings, String> {
    let listen = if !a.listen.is_empty() {
        a.listen.clone()
    } else {
        f.listen
            .iter()
            .map(|l| {
                l.address
                    .parse::<rtrs_fabric::Address>()
                    .map_err(|e| format!("listen address {:?}: {e}", l.address))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    if listen.is_empty() {
        return Err("no listener: give --listen ADDR or [[listen]] address in --config".into());
    }
    let exports = if !a.exports.is_empty() {
        a.exports.clone()
    } else {
        f.export.iter().map(ExportCfg::spec).collect()
    };
    if exports.is_empty() {
        return Err("no export: give --export NAME=SPEC or [[export]] in --config".into());
    }
    let cores = if !a.cores.is_empty() {
        a.cores.clone()
    } else {
        f.cores.clone().unwrap_or_else(|| vec![0])
    };
    if cores.is_empty() {
        return Err("cores = [] : give at least one poll core".into());
    }
    let metrics = match (&a.metrics, &f.metrics) {
        (Some(m), _) => Some(*m),
        (None, Some(s)) => Some(
            s.parse()
                .map_err(|e| format!("metrics = {s:?}: {e} (expected e.g. 127.0.0.1:9465)"))?,
        ),
        (None, None) => None,
    };
    let chunk = match (a.chunk_size, &f.chunk_size) {
        (Some(c), _) => u64::from(c),
        (None, Some(s)) => s.bytes("chunk_size")?,
        (None, None) => 128 << 10,
    };
    let file_allow = f
        .access
        .allow
        .iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .map_err(|e| format!("access.allow {s:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let l = &f.limits;
    let x = &a.access;
    // flag, else file, else default; then in 1..=hi.
    let lim = |key: &str, flag: Option<u64>, file: Option<u64>, default: u64, hi: u64| {
        in_range(key, pick(flag, file, default), 1, hi)
    };
    let size = |s: &Option<Size>, key: &str| s.as_ref().map(|s| s.bytes(key)).transpose();
    let access = Access {
        allow: if x.allow.is_empty() {
            file_allow
        } else {
            x.allow.clone()
        },
        auth_key: x.auth_key.clone().or_else(|| f.access.auth_key.clone()),
        insecure: x.insecure || f.access.insecure.unwrap_or(false),
        max_sessions: lim(
            "max_sessions",
            x.max_sessions,
            l.max_sessions,
            256,
            1_000_000,
        )?,
        max_sessions_per_host: lim(
            "max_sessions_per_host",
            x.max_sessions_per_host,
            l.max_sessions_per_host,
            16,
            1_000_000,
        )?,
        max_paths_per_session: lim(
            "max_paths_per_session",
            x.max_paths_per_session,
            l.max_paths_per_session,
            128,
            128,
        )?,
        max_handshakes_per_host: lim(
            "max_handshakes_per_host",
            x.max_handshakes_per_host,
            l.max_handshakes_per_host,
            256,
            1_000_000,
        )?,
        handshake_timeout: lim(
            "handshake_timeout",
            x.handshake_timeout,
            l.handshake_timeout,
            30,
            3600,
        )?,
        memory_budget: x.memory_budget.or(size(&l.memory_budget, "memory_budget")?),
        hugepage_limit: x
            .hugepage_limit
            .or(size(&f.hugepage_limit, "hugepage_limit")?),
        max_registrations: match x.max_registrations.map(u64::from).or(l.max_registrations) {
            Some(n) => Some(in_range("max_registrations", n, 64, 1 << 22)? as u32),
            None => None,
        },
        prealloc_sessions: in_range(
            "prealloc_sessions",
            pick(x.prealloc_sessions, l.prealloc_sessions, 2),
            0,
            4096,
        )?,
    };
    Ok(Settings {
        listen,
        exports,
        cores,
        control_cpu: a.control_cpu.or(f.control_cpu),
        poll_sched: match (a.poll_sched, &f.poll_sched) {
            (Some(p), _) => p,
            (None, Some(s)) => s.parse().map_err(|e| format!("poll_sched: {e}"))?,
            (None, None) => pollers::CoreSched::Normal,
        },
        metrics,
        ctl: a.ctl.clone().or_else(|| f.ctl.clone()),
        always_invalidate: pick(a.always_invalidate, f.always_invalidate, true),
        queue_depth: in_range(
            "queue_depth",
            pick(a.queue_depth.map(u64::from), f.queue_depth, 512),
            1,
            65535,
        )? as u16,
        chunk_size: u32::try_from(chunk).map_err(|_| format!("chunk_size = {chunk} is too big"))?,
        hb_interval_ms: in_range(
            "hb_interval_ms",
            pick(a.hb_interval_ms, f.hb_interval_ms, 5000),
            1,
            3_600_000,
        )?,
        hb_missed: in_range(
            "hb_missed",
            pick(a.hb_missed.map(u64::from), f.hb_missed, 5),
            1,
            1000,
        )? as u32,
        access,
    })
}

/// The log format the file asks for ("text"/"json").
pub fn log_format(f: &FileConfig) -> Result<Option<crate::LogFormat>, String> {
    match f.log_format.as_deref() {
        None => Ok(None),
        Some("text") => Ok(Some(crate::LogFormat::Text)),
        Some("json") => Ok(Some(crate::LogFormat::Json)),
        Some(o) => Err(format!("log_format = {o:?}: expected \"text\" or \"json\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(flags: &[&str]) -> crate::ServeArgs {
        let mut v = vec!["rtrs", "serve"];
        v.extend_from_slice(flags);
        match crate::Cli::try_parse_from(v).unwrap().cmd {
            crate::Cmd::Serve(a) => *a,
            _ => unreachable!(),
        }
    }

    fn example() -> FileConfig {
        let text = include_str!("../../scripts/deploy/rtrs.toml");
        parse(text).unwrap()
    }

    #[test]
    fn the_example_config_parses_and_resolves() {
        let f = example();
        let s = resolve(&args(&[]), &f).unwrap();
        assert_eq!(s.listen[0].to_string(), "tcp:10.0.0.1:1234");
        assert_eq!(s.cores, [2, 3]);
        assert_eq!(s.control_cpu, Some(0));
        assert_eq!(s.poll_sched, pollers::CoreSched::Normal);
        // The flag wins over the file; a bad value in the file is named.
        let s = resolve(&args(&["--poll-sched", "idle"]), &f).unwrap();
        assert_eq!(s.poll_sched, pollers::CoreSched::Idle);
        let bad = parse("poll_sched = \"fifo\"").unwrap();
        let e = resolve(&args(&["--listen", "shm:x", "--export", "a=ram:1M"]), &bad).unwrap_err();
        assert!(e.contains("poll_sched"), "{e}");
        let s = resolve(&args(&[]), &f).unwrap();
        assert_eq!(s.exports[0], "d0=file:/dev/nvme0n1");
        assert_eq!(s.exports[1], "scratch=ram:1G,ro,allow=sess-a|sess-b");
        assert_eq!(s.access.allow[0].to_string(), "10.0.0.0/8");
        assert_eq!(s.access.hugepage_limit, Some(2 << 30));
        assert_eq!(s.ctl.as_deref(), Some(Path::new("/run/rtrs/ctl.sock")));
        assert_eq!(s.metrics.unwrap().port(), 9465);
        assert_eq!(log_format(&f).unwrap(), Some(crate::LogFormat::Json));
        for e in &s.exports[1..] {
            rtrs_poll::rnbd::Export::parse(e).unwrap();
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        for (text, key) in [
            ("corez = [1]\n", "corez"),
            ("[limits]\nmax_session = 3\n", "max_session"),
            ("[[listen]]\naddress = \"shm:x\"\nport = 3\n", "port"),
            (
                "[[export]]\nname = \"a\"\ndevice = \"ram:1M\"\nread_only = true\n",
                "read_only",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = parse("cores = \"two\"\n").unwrap_err();
        assert!(e.contains("cores"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let f = example();
        let s = resolve(
            &args(&[
                "--listen",
                "shm:x",
                "--cores",
                "5",
                "--queue-depth",
                "64",
                "--max-sessions",
                "7",
                "--export",
                "z=ram:1M",
            ]),
            &f,
        )
        .unwrap();
        assert_eq!(s.listen[0].to_string(), "shm:x");
        assert_eq!(s.cores, [5]);
        assert_eq!(s.queue_depth, 64);
        assert_eq!(s.access.max_sessions, 7);
        assert_eq!(s.exports, ["z=ram:1M"]);
        // Not given: the file's.
        assert_eq!(s.access.max_sessions_per_host, 8);
        assert_eq!(s.control_cpu, Some(0));
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        let bad = |text: &str, key: &str| {
            let f = parse(text).unwrap();
            let e = resolve(&args(&["--listen", "shm:x", "--export", "a=ram:1M"]), &f).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        };
        bad("queue_depth = 0\n", "queue_depth");
        bad(
            "[limits]\nmax_paths_per_session = 500\n",
            "max_paths_per_session",
        );
        bad("hugepage_limit = \"lots\"\n", "hugepage_limit");
        bad("metrics = \"nowhere\"\n", "metrics");
        bad("[access]\nallow = [\"10.0.0.0/99\"]\n", "access.allow");
        let e = resolve(&args(&[]), &FileConfig::default()).unwrap_err();
        assert!(e.contains("--listen"), "{e}");
        assert!(log_format(&parse("log_format = \"xml\"\n").unwrap()).is_err());
    }
}
