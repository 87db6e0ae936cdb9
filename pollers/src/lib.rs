//! pollers: pinned run-to-completion cores, a slow-path thread, lock-free rings.
#![warn(missing_docs)]
