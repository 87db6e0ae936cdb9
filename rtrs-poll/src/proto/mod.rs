//! The wire protocol, without I/O.
