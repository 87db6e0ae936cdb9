//! The census contract (`fabric::live`, tests/common/census_suite.rs) over
//! the software backends, in a test binary of its own: the counts are
//! process-wide, so its one test runs every case in turn, alone.
//! The software backends' PDs, MRs, CQs, QPs and shm's region-table
//! entries each hold a `live::Live` token of their kind.

mod common;

use common::soft::{Shm, Tcp};

#[test]
fn soft_backends_count_every_object_they_hold() {
    use common::census_suite as s;
    s::objects_are_counted_while_they_live::<Shm>();
    s::a_session_and_its_server_leave_nothing::<Shm>();
    s::objects_are_counted_while_they_live::<Tcp>();
    s::a_session_and_its_server_leave_nothing::<Tcp>();
}
