//! The census contract (`fabric::live`, tests/common/census_suite.rs) over
//! the software backends, in a test binary of its own: the counts are
//! process-wide, so its one test runs every case in turn, alone.
//!
//! Ignored until the software backends count their objects: their PDs,
//! MRs, CQs, QPs and shm's region-table entries live in
//! `rtrs_poll::fabric::soft` (each would hold a `live::Live` token of its
//! kind, as the rdma backend counts its verbs calls). Until then the churn
//! test (`scripts/churn.sh`) checks them through the descriptors each holds
//! (a tcp QP's socket, an shm QP's ring and a region's memfd).

mod common;

use common::soft::{Shm, Tcp};

#[test]
#[ignore = "the software backends do not count their objects yet (rtrs_poll::fabric::soft)"]
fn soft_backends_count_every_object_they_hold() {
    use common::census_suite as s;
    s::objects_are_counted_while_they_live::<Shm>();
    s::a_session_and_its_server_leave_nothing::<Shm>();
    s::objects_are_counted_while_they_live::<Tcp>();
    s::a_session_and_its_server_leave_nothing::<Tcp>();
}
