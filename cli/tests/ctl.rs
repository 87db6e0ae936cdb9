//! `rtrs serve --ctl SOCKET` and `rtrs ctl`: a running server over shm with
//! a client session, listed, counted, acted on; exports added and removed
//! at runtime; bad commands refused with the server unaffected; a foreign
//! uid refused; the metrics endpoint with the same counters, checked as
//! exposition text. (docs/deploy.md "Looking into a running server")

mod common;
use common::{ctl, ctl_as, json, open, rtrs, session_with, wait_for, write, Served, TempDir};
use rtrs_proto::rnbd::AccessMode;
use std::path::Path;
use std::time::Duration;

const EBUSY: i32 = 16;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    body.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The text is exposition format 0.0.4 as far as a scraper cares: every
/// sample's family has one TYPE line, given before its samples; names and
/// labels well formed; values numbers.
fn check_exposition(text: &str) {
    let mut typed: std::collections::HashMap<String, String> = Default::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            assert!(
                ["counter", "gauge", "summary", "histogram", "untyped"].contains(&ty),
                "{line}"
            );
            assert!(
                typed.insert(name.into(), ty.into()).is_none(),
                "two TYPEs: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "{line}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "value of {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let family = typed
            .keys()
            .find(|f| {
                name == f.as_str()
                    || (typed[*f] == "summary"
                        && (name == format!("{f}_sum") || name == format!("{f}_count")))
            })
            .unwrap_or_else(|| panic!("no TYPE before {line}"));
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for kv in labels[1..labels.len() - 1].split("\",") {
                    let (k, v) = kv.split_once('=').unwrap();
                    assert!(!k.is_empty() && v.starts_with('"'), "{line}");
                }
            }
        }
        if typed[family] == "summary" && name == family.as_str() {
            assert!(series.contains("quantile=\""), "{line}");
        }
    }
}

#[test]
fn ctl_lists_counts_and_acts_on_a_running_server() {
    let name = format!("rtrs-ctl-{}", std::process::id());
    let dir = TempDir::new(&name);
    let sock = dir.0.join("ctl.sock");
    let port = free_port();
    let srv = Served::start_with(
        &name,
        &["ram0=ram:4M"],
        &[
            "--ctl",
            sock.to_str().unwrap(),
            "--metrics",
            &format!("127.0.0.1:{port}"),
            "--cores",
            "0",
        ],
    );
    wait_for("the control socket", || sock.exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the socket is the owner's only");
    }
    assert_eq!(json(&sock, &["list", "sessions"]), serde_json::json!([]));

    // A session that reconnects at once after a disconnect.
    let (clt, mut core, mut rn) = session_with(&name, "ctl-a", |c| {
        c.reconnect.delay = Duration::from_millis(100);
        c.reconnect.backoff = Duration::from_millis(10);
    });
    let dev = open(&mut core, &mut rn, "ram0", AccessMode::Rw).unwrap();
    for i in 0..20 {
        assert_eq!(write(&mut core, &dev, i), 0);
    }

    let sessions = json(&sock, &["list", "sessions"]);
    assert_eq!(sessions[0]["name"], "ctl-a", "{sessions}");
    assert_eq!(sessions[0]["paths"].as_array().unwrap().len(), 1);
    assert_eq!(sessions[0]["devices"][0]["export"], "ram0");
    assert_eq!(sessions[0]["devices"][0]["mode"], "rw");
    let (ok, table, _) = ctl(&sock, &["list", "sessions"]);
    assert!(
        ok && table.starts_with("SESSION") && table.contains("ctl-a"),
        "{table}"
    );

    let paths = json(&sock, &["list", "paths"]);
    let path_id = paths[0]["id"].as_str().unwrap().to_string();
    assert_eq!(paths[0]["state"], "connected");
    assert!(paths[0]["peer"].as_str().unwrap().starts_with("shm:"));

    // Counters moved with the IO: the path's, the core's, the latency.
    let stats = json(&sock, &["stats", "--path", &path_id[..8]]);
    let p = &stats["sessions"][0]["paths"][0];
    assert!(
        p["stats"]["write"]["cnt"].as_u64().unwrap() >= 20,
        "{stats}"
    );
    assert!(p["stats"]["write"]["bytes"].as_u64().unwrap() >= 20 * 4096);
    assert!(p["stats"]["latency"]["count"].as_u64().unwrap() >= 20);
    assert!(p["stats"]["latency"]["p50_ns"].as_u64().unwrap() > 0);
    let c = &json(&sock, &["stats", "--core", "0"])["cores"][0];
    assert!(c["ios"].as_u64().unwrap() >= 20, "{c}");
    assert!(c["polls"].as_u64().unwrap() > 0, "{c}");
    assert!(c["latency"]["p99_ns"].as_u64().unwrap() > 0, "{c}");
    let (ok, human, _) = ctl(&sock, &["stats"]);
    assert!(
        ok && human.contains(&path_id) && human.contains("P99.9_US"),
        "{human}"
    );

    // Exports at runtime: added, opened; not removed while open.
    let (ok, _, err) = ctl(&sock, &["export", "add", "extra", "ram:1M"]);
    assert!(ok, "{err}");
    let extra = open(&mut core, &mut rn, "extra", AccessMode::Rw).unwrap();
    assert_eq!(write(&mut core, &extra, 9), 0);
    let (ok, out, err) = ctl(&sock, &["--json", "export", "remove", "extra"]);
    assert!(!ok && err.contains("EBUSY"), "{out} {err}");
    assert!(out.contains(&format!("\"errno\":-{EBUSY}")), "{out}");
    rn.close(&extra, &mut || {
        core.poll(minstant::Instant::now(), &mut |_| {});
    })
    .unwrap();
    // force-close (the kernel's rnbd-server force_close): the device's IO
    // fails from then on.
    let again = open(&mut core, &mut rn, "extra", AccessMode::Rw).unwrap();
    let id = again.device_id().to_string();
    let (ok, _, err) = ctl(&sock, &["export", "remove", "extra"]);
    assert!(!ok && err.contains("EBUSY"), "{err}");
    let r = json(&sock, &["force-close", "ctl-a", &id]);
    assert_eq!(r["export"], "extra", "{r}");
    assert_eq!(
        write(&mut core, &again, 3),
        -107,
        "ENOTCONN after force-close"
    );
    let (ok, _, err) = ctl(&sock, &["force-close", "ctl-a", &id]);
    assert!(!ok && err.contains("has no device"), "{err}");
    let (ok, _, err) = ctl(&sock, &["export", "remove", "extra"]);
    assert!(ok, "{err}");
    let devs = json(&sock, &["list", "devices"]);
    let names: Vec<&str> = devs["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ram0"]);
    assert_eq!(
        open(&mut core, &mut rn, "extra", AccessMode::Ro).err(),
        Some(-2),
        "a removed export is gone (ENOENT)"
    );

    // Bad commands: errors, non-zero exits, the server unaffected.
    for (args, says) in [
        (vec!["stats", "--core", "9"], "no core 9"),
        (vec!["disconnect", "ffffffff"], "no such path"),
        (vec!["close", "nobody"], "no such session"),
        (vec!["export", "add", "bad", "disk:1M"], "export"),
        (vec!["export", "remove", "nothing"], "no such export"),
    ] {
        let (ok, _, err) = ctl(&sock, &args);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
    }
    {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(b"{\"v\":1,\"cmd\":\"shutdown\"}\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(
            line.contains("\"ok\":false") && line.contains("bad request"),
            "{line}"
        );
    }
    assert_eq!(json(&sock, &["list", "paths"])[0]["id"], path_id.as_str());

    // The metrics: the same counters with labels, latency summaries.
    let text = get_metrics(port);
    check_exposition(&text);
    for m in [
        "# TYPE rtrs_io_latency_seconds summary",
        "rtrs_io_latency_seconds{core=\"0\",cpu=\"0\",quantile=\"0.99\"}",
        "rtrs_io_latency_seconds_count{core=\"0\",cpu=\"0\"}",
        &format!("rtrs_path_ios_total{{session=\"ctl-a\",path=\"{path_id}\",dir=\"write\"}}"),
        &format!(
            "rtrs_path_latency_seconds{{session=\"ctl-a\",path=\"{path_id}\",quantile=\"0.5\"}}"
        ),
        "rtrs_core_polls_total{core=\"0\",cpu=\"0\"}",
        "rtrs_session_open_devices{session=\"ctl-a\"} 1",
        "# TYPE rtrs_refusals_total counter",
    ] {
        assert!(text.contains(m), "{m} missing in {text}");
    }

    // disconnect: the path closes, logged and counted; the client comes back
    // (the same path uuid, as the kernel's reconnect) on a new server path:
    // its counters start again.
    let r = json(&sock, &["disconnect", &path_id]);
    assert_eq!(r["closed"], 1, "{r}");
    wait_for("the client's new path", || {
        let p = json(&sock, &["list", "paths"]);
        p.as_array().unwrap().iter().any(|p| {
            p["id"] == path_id.as_str()
                && p["state"] == "connected"
                && p["stats"]["write"]["cnt"] == 0
        })
    });
    let s = json(&sock, &["stats"]);
    assert_eq!(s["operator_closes"], 1, "{s}");
    // close: every path of the session.
    let r = json(&sock, &["close", "ctl-a"]);
    assert_eq!(r["closed"], 1, "{r}");
    assert!(get_metrics(port).contains("rtrs_operator_path_closes_total 2"));

    drop((rn, core));
    clt.close();
    let log = srv.stop();
    assert!(
        log.matches("the operator closes the path").count() == 2,
        "{log}"
    );
    assert!(log.contains("remove export refused: it is open"), "{log}");
    assert!(
        log.contains("rnbd: device extra closed (by the operator)"),
        "{log}"
    );
    assert!(!sock.exists(), "the socket is removed at exit");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn no_server_is_said_plainly() {
    let (ok, _, err) = ctl(Path::new("/nonexistent/rtrs.sock"), &["list", "paths"]);
    assert!(!ok);
    assert!(err.contains("is rtrs serve running with --ctl"), "{err}");
}

/// Only the server's uid (or root) may use the socket: the file mode keeps
/// others out; with the mode opened up, SO_PEERCRED still does (refused,
/// logged, counted).
#[test]
fn a_foreign_uid_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: runs the ctl client as uid 65534, which needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let name = format!("rtrs-ctl-uid-{}", std::process::id());
    let dir = TempDir::new(&name);
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.0.join("ctl.sock");
    let srv = Served::start_with(&name, &["r=ram:1M"], &["--ctl", sock.to_str().unwrap()]);
    wait_for("the control socket", || sock.exists());
    let (ok, _, err) = ctl_as(&sock, &["list", "paths"], Some(65534));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, _, err) = ctl_as(&sock, &["list", "paths"], Some(65534));
    assert!(!ok && err.contains("uid 65534 may not control"), "{err}");
    // Root still may, and the refusal is counted.
    assert_eq!(json(&sock, &["stats"])["ctl_refused"], 1);
    let log = srv.stop();
    assert!(
        log.contains("ctl: refused a connection from another user"),
        "{log}"
    );
}

/// `rtrs serve --config FILE`: the file's settings, a flag over them.
#[test]
fn serve_from_a_config_file() {
    let name = format!("rtrs-ctl-cfg-{}", std::process::id());
    let dir = TempDir::new(&name);
    let sock = dir.0.join("ctl.sock");
    let cfg = dir.0.join("rtrs.toml");
    std::fs::write(
        &cfg,
        format!(
            "cores = [0]\nctl = {:?}\nqueue_depth = 64\n\n[[listen]]\naddress = \"shm:{name}-never\"\n\n\
             [[export]]\nname = \"c0\"\ndevice = \"ram:1M\"\nro = true\n",
            sock.to_str().unwrap()
        ),
    )
    .unwrap();
    // The flag's listener wins over the file's.
    let srv = Served::start_with(&name, &[], &["--config", cfg.to_str().unwrap()]);
    wait_for("the control socket", || sock.exists());
    let d = json(&sock, &["list", "devices"]);
    assert_eq!(d["exports"][0]["name"], "c0");
    assert_eq!(d["exports"][0]["read_only"], true);
    let log = srv.stop();
    assert!(log.contains(&format!("listening on shm:{name} ")), "{log}");
    assert!(log.contains("queue depth 64"), "{log}");

    // An unknown key: named, and no server.
    std::fs::write(&cfg, "cores = [0]\nqueue_deep = 3\n").unwrap();
    let out = rtrs()
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("queue_deep"), "{err}");
}

/// A session connect and close, a path up and down, a device open and
/// close: one log line each, at info.
#[test]
fn one_info_line_per_session_path_and_device_event() {
    let name = format!("rtrs-ctl-log-{}", std::process::id());
    let srv = Served::start(&name, &["ram0=ram:1M", "ram1=ram:1M"]);
    let (clt, mut core, mut rn) = session_with(&name, "ev-a", |_| {});
    let dev = open(&mut core, &mut rn, "ram0", AccessMode::Rw).unwrap();
    // Left open: closed by the session's end.
    open(&mut core, &mut rn, "ram1", AccessMode::Ro).unwrap();
    rn.close(&dev, &mut || {
        core.poll(minstant::Instant::now(), &mut |_| {});
    })
    .unwrap();
    drop((rn, core));
    clt.close();
    wait_for("the session's end", || {
        srv.stderr().contains("session ev-a closed")
    });
    let log = srv.stop();
    let lines: Vec<&str> = log.lines().collect();
    for (what, parts) in [
        ("session connected", &["session ev-a connected"][..]),
        ("path up", &["path ev-a (", ") connected"][..]),
        ("device opened", &["rnbd: device ram0 opened"][..]),
        (
            "device closed",
            &["rnbd: device ram0 closed (by the client)"][..],
        ),
        (
            "device closed with its session",
            &["rnbd: device ram1 closed (the session ended)", "ev-a"][..],
        ),
        ("path down", &["path ev-a (", ") closed: "][..]),
        ("session closed", &["session ev-a closed"][..]),
    ] {
        let hits: Vec<&&str> = lines
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .collect();
        assert_eq!(hits.len(), 1, "{what}: {hits:?} in {log}");
        assert!(hits[0].contains("INFO"), "{what} at info: {}", hits[0]);
    }
}

/// A socket file left by a server that died is replaced; one a live server
/// answers on is not taken over.
#[test]
fn a_stale_socket_is_replaced_and_a_live_one_kept() {
    let name = format!("rtrs-ctl-stale-{}", std::process::id());
    let dir = TempDir::new(&name);
    let sock = dir.0.join("ctl.sock");
    // Bound, then nobody listens: a stale file.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let srv = Served::start_with(&name, &["r=ram:1M"], &["--ctl", sock.to_str().unwrap()]);
    wait_for("the control socket", || ctl(&sock, &["list", "paths"]).0);
    let out = rtrs()
        .args([
            "serve",
            "--listen",
            &format!("shm:{name}-2"),
            "--export",
            "r=ram:1M",
        ])
        .args(["--ctl", sock.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another server answers on it"),
        "{err}"
    );
    // The first server still answers.
    assert!(ctl(&sock, &["list", "paths"]).0);
    srv.stop();
    assert!(!sock.exists());

    // A server that fails to start (its port is taken) leaves no socket.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = rtrs()
        .args(["serve", "--listen", &format!("tcp:127.0.0.1:{port}")])
        .args(["--export", "r=ram:1M", "--ctl", sock.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("listen on"), "{err}");
    assert!(
        !sock.exists(),
        "a socket left by a server that did not start"
    );
}

/// `--poll-sched idle`: the server's core threads run under SCHED_IDLE (as
/// /proc shows them), and the startup line says so.
#[test]
fn serve_runs_its_poll_cores_under_the_poll_sched_asked_for() {
    let name = format!("rtrs-sched-{}", std::process::id());
    let s = Served::start_with(&name, &["ram0=ram:1M"], &["--poll-sched", "idle"]);
    assert!(s.stderr().contains("sched idle"), "{}", s.stderr());
    let tasks = format!("/proc/{}/task", s.child.id());
    let mut policies = Vec::new();
    for t in std::fs::read_dir(&tasks).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("rtrs-core") {
            let sched = std::fs::read_to_string(t.path().join("sched")).unwrap_or_default();
            let policy = sched
                .lines()
                .find(|l| l.starts_with("policy"))
                .and_then(|l| l.rsplit(':').next())
                .map(|v| v.trim().to_string());
            policies.push(policy);
        }
    }
    s.stop();
    // SCHED_IDLE is policy 5.
    assert_eq!(policies, [Some("5".to_string())]);
}
