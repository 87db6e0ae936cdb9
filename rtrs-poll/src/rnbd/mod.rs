//! RNBD 2.0 over the RTRS engine: the block device protocol the kernel's
//! rnbd-client and rnbd-server speak.
//!
//! ```text
//!  client (rnbd::clt)                         server (rnbd::srv)
//!   sess_info  READ  usr=sess_info(36)  ----> ver = min(client, 2) -> sess_info_rsp (data)
//!   open       READ  usr=open(264)      ----> export by name, access-mode rules -> open_rsp (data)
//!   IO         WRITE/READ usr=io(32)    ----> device id -> export at sector * 512: RAM at once,
//!                                               a file or device through the connection's io_uring (backend)
//!   close      WRITE usr=close(8)       ----> release the id
//!  the RTRS session's end closes everything it had open (RnbdServer::session_ended)
//! ```

pub mod backend;
#[cfg(test)]
mod backend_tests;
pub mod clt;
pub mod srv;

pub use backend::BackendCounters;
pub use clt::{RnbdClient, RnbdDev, RnbdError, RnbdEvent};
pub use srv::{
    Export, ExportError, OpenDevice, RnbdCounters, RnbdHandler, RnbdRefusal, RnbdServer, Rule,
    MAX_EXPORTS,
};
