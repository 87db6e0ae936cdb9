//! Secure by default in the library itself: a tcp listener other hosts
//! reach, with no allowlist and no key, is refused unless the caller says
//! insecure (issue 21). Loopback and shm need nothing.

use rtrs_poll::srv::Limits;
use rtrs_poll::{
    Address, AuthKey, ConInfo, CorePool, Handler, Server, ShmFabric, SrvConfig, SrvError, SrvIo,
    TcpConfig, TcpFabric, Verdict,
};
use std::sync::Arc;

struct Zero;
impl Handler for Zero {
    fn on_io(&mut self, _io: SrvIo<'_>) -> Verdict {
        Verdict::Done(0)
    }
}

fn cfg(limits: Limits) -> SrvConfig {
    SrvConfig {
        queue_depth: 4,
        max_chunk_size: 8192,
        limits,
        ..SrvConfig::default()
    }
}

fn listen<F: rtrs_poll::Fabric>(fabric: &F, addr: &str, limits: Limits) -> Result<(), SrvError> {
    let addr: Address = addr.parse().unwrap();
    let cores = CorePool::launch(&[0]).unwrap();
    let r = Server::listen(
        fabric,
        &addr,
        cfg(limits),
        |_: &ConInfo| Zero,
        cores.place(),
    );
    let out = r.map(|s| s.stop());
    cores.stop();
    out
}

#[test]
fn an_open_tcp_listener_without_an_access_rule_is_refused() {
    let e = listen(&TcpFabric::new(), "tcp:0.0.0.0:0", Limits::default()).unwrap_err();
    assert!(matches!(e, SrvError::Exposed(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("allowlist") && msg.contains("insecure"),
        "{msg}"
    );
}

#[test]
fn an_allowlist_a_key_or_insecure_said_out_loud_opens_it() {
    let allow = Limits {
        allow: vec!["10.0.0.0/8".parse().unwrap()],
        ..Limits::default()
    };
    listen(&TcpFabric::new(), "tcp:0.0.0.0:0", allow).unwrap();
    let keyed = TcpFabric::with_config(TcpConfig {
        auth: Some(Arc::new(AuthKey::new(b"0123456789abcdef-secret").unwrap())),
        ..TcpConfig::default()
    });
    listen(&keyed, "tcp:0.0.0.0:0", Limits::default()).unwrap();
    let insecure = Limits {
        insecure: true,
        ..Limits::default()
    };
    listen(&TcpFabric::new(), "tcp:0.0.0.0:0", insecure).unwrap();
}

#[test]
fn loopback_and_shm_need_nothing_and_listen_also_is_checked_too() {
    listen(&TcpFabric::new(), "tcp:127.0.0.1:0", Limits::default()).unwrap();
    listen(&TcpFabric::new(), "tcp:[::1]:0", Limits::default()).unwrap();
    let shm = format!("shm:secure-defaults-{}", std::process::id());
    listen(&ShmFabric::new(), &shm, Limits::default()).unwrap();
    // A server opened on loopback cannot add an open listener either.
    let fabric = TcpFabric::new();
    let cores = CorePool::launch(&[0]).unwrap();
    let addr: Address = "tcp:127.0.0.1:0".parse().unwrap();
    let srv = Server::listen(
        &fabric,
        &addr,
        cfg(Limits::default()),
        |_: &ConInfo| Zero,
        cores.place(),
    )
    .unwrap();
    let open: Address = "tcp:0.0.0.0:0".parse().unwrap();
    assert!(matches!(srv.listen_also(&open), Err(SrvError::Exposed(_))));
    srv.stop();
    cores.stop();
}
