//! Session pieces both sides share, without I/O: the heartbeat, the client
//! path state machine with reconnect timing, multipath policies and permits.

pub mod hb;
pub mod mp_policy;
pub mod path;
pub mod permit;
