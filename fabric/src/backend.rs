//! The one address -> backend dispatch: every binary, the C ABI and an
//! embedder pick the fabric an [`Address`] names here, and nowhere else.
//!
//! ```text
//!   "shm:NAME"       -> ShmFabric  (one host, shared memory)
//!   "tcp:HOST:PORT"  -> TcpFabric  (with Backends::tcp: key, handshake allowance)
//!   "rdma:HOST:PORT" -> RdmaFabric (feature "rdma"; FabricError::NotBuilt without it)
//! ```
//!
//! Code above the fabric is generic over [`Fabric`]; a closure cannot be, so
//! the work to run is an [`OnFabric`] value:
//!
//! ```
//! use rtrs_fabric::{with_backend, Address, Backends, Cm, Fabric, FabricError, OnFabric};
//!
//! struct Listen<'a>(&'a Address);
//! impl OnFabric for Listen<'_> {
//!     type Output = Result<&'static str, FabricError>;
//!     fn run<F: Fabric>(self, fabric: F) -> Self::Output {
//!         fabric.create_cm()?.listen(self.0)?;
//!         Ok(fabric.name())
//!     }
//! }
//!
//! let shm: Address = format!("shm:doc-backend-{}", std::process::id()).parse()?;
//! assert_eq!(with_backend(&shm, &Backends::default(), Listen(&shm))??, "shm");
//! let tcp: Address = "tcp:127.0.0.1:0".parse()?;
//! assert_eq!(with_backend(&tcp, &Backends::default(), Listen(&tcp))??, "tcp");
//! # Ok::<(), FabricError>(())
//! ```

use crate::soft::shm::{ShmConfig, ShmFabric};
use crate::soft::tcp::{TcpConfig, TcpFabric};
use crate::{Address, Fabric, Result};

/// Work to run on whichever fabric the address selects.
pub trait OnFabric {
    /// What the work returns.
    type Output;
    /// Runs the work on `fabric`.
    fn run<F: Fabric>(self, fabric: F) -> Self::Output;
}

/// Settings of the backends an address may select (each used only by its
/// own scheme).
#[derive(Clone, Debug, Default)]
pub struct Backends {
    /// The shm fabric's table sizes.
    pub shm: ShmConfig,
    /// The tcp fabric's buffers, pre-shared key and handshake allowance.
    pub tcp: TcpConfig,
}

/// Builds the backend `addr` names with `backends`' settings and runs `job`
/// on it. Fails with [`FabricError::NotBuilt`](crate::FabricError::NotBuilt)
/// for `rdma:` in a build without the `rdma` feature, and with the verbs
/// stack's error where there is no RDMA device.
pub fn with_backend<J: OnFabric>(addr: &Address, backends: &Backends, job: J) -> Result<J::Output> {
    match addr {
        Address::Shm(_) => Ok(job.run(ShmFabric::with_config(backends.shm))),
        Address::Tcp { .. } => Ok(job.run(TcpFabric::with_config(backends.tcp.clone()))),
        #[cfg(feature = "rdma")]
        Address::Rdma { .. } => Ok(job.run(crate::rdma::RdmaFabric::new()?)),
        #[cfg(not(feature = "rdma"))]
        Address::Rdma { .. } => Err(crate::FabricError::NotBuilt("rdma")),
    }
}
