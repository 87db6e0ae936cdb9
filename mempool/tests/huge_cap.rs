//! The process's hugepage cap (its own test binary: the cap is global).

use mempool::{huge_stats, set_hugepage_limit, Region, HUGE_PAGE};

#[test]
fn past_the_cap_regions_come_from_small_pages_and_count() {
    set_hugepage_limit(0);
    let before = huge_stats();
    assert_eq!(before.limit, 0);
    let r = Region::shareable(HUGE_PAGE).unwrap();
    let a = Region::anonymous(HUGE_PAGE).unwrap();
    assert!(!r.is_huge() && !a.is_huge(), "no hugepage past the cap");
    let after = huge_stats();
    assert_eq!(after.held, 0);
    assert_eq!(
        after.fallbacks,
        before.fallbacks + 2,
        "each fallback counted"
    );
    drop((r, a));
    // With room, what hugepages the host has are taken and given back.
    set_hugepage_limit(u64::MAX - 1);
    let r = Region::shareable(HUGE_PAGE).unwrap();
    assert_eq!(
        huge_stats().held,
        if r.is_huge() { HUGE_PAGE as u64 } else { 0 }
    );
    drop(r);
    assert_eq!(huge_stats().held, 0, "given back on drop");
}
