//! `--cores`: CPU lists as taskset and fio take them ("0", "0,1", "0-3",
//! "0-1,3"), checked against the CPUs this process may run on, and pinning
//! that fails loudly.

/// A list of distinct CPU ids, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cores(pub Vec<usize>);

/// The CPUs this process may run on (its affinity mask, which leaves out
/// offline CPUs and those a cpuset or taskset withholds).
pub fn allowed() -> Result<Vec<usize>, String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; set is a cpu_set_t of the size given.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(format!(
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    let n = 8 * std::mem::size_of_val(&set);
    // SAFETY: i < CPU_SETSIZE; set is initialised.
    Ok((0..n)
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect())
}

/// Parses a CPU list without checking the CPUs exist.
pub fn parse_list(s: &str) -> Result<Vec<usize>, String> {
    let bad = |why: &str| format!("bad core list {s:?}: {why} (expected e.g. 0, 0,1, 0-3, 0-1,3)");
    if s.trim().is_empty() {
        return Err(bad("empty"));
    }
    let mut v = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| bad(&format!("{x:?} is not a CPU number")))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi {
            return Err(bad(&format!("range {part} runs backwards")));
        }
        if hi - lo >= 4096 {
            return Err(bad(&format!("range {part} is too long")));
        }
        for c in lo..=hi {
            if v.contains(&c) {
                return Err(bad(&format!("CPU {c} is listed twice")));
            }
            v.push(c);
        }
    }
    Ok(v)
}

/// Parses a CPU list and refuses CPUs outside `allowed`.
pub fn parse_checked(s: &str, allowed: &[usize]) -> Result<Cores, String> {
    let v = parse_list(s)?;
    let missing: Vec<String> = v
        .iter()
        .filter(|c| !allowed.contains(c))
        .map(|c| c.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "CPU {} not available to this process (offline, or outside its affinity mask); available: {}",
            missing.join(","),
            compact(allowed)
        ));
    }
    Ok(Cores(v))
}

/// The clap value parser for every `--cores`.
pub fn parse(s: &str) -> Result<Cores, String> {
    parse_checked(s, &allowed()?)
}

/// "0-3,6" for `[0, 1, 2, 3, 6]`.
pub fn compact(v: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Pins the calling thread to `core`; an error when that is not possible
/// (a run that was asked to be pinned never runs unpinned).
pub fn pin(core: usize) -> Result<(), String> {
    // Not through get_core_ids(): it lists the calling thread's current mask,
    // which a thread spawned by an already pinned one inherits.
    if core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        Ok(())
    } else {
        Err(format!("could not pin a thread to CPU {core}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_ranges_and_mixes_parse() {
        assert_eq!(parse_list("0"), Ok(vec![0]));
        assert_eq!(parse_list("0,1"), Ok(vec![0, 1]));
        assert_eq!(parse_list("0-3"), Ok(vec![0, 1, 2, 3]));
        assert_eq!(parse_list("0-1,3"), Ok(vec![0, 1, 3]));
        assert_eq!(parse_list(" 2 , 0 "), Ok(vec![2, 0]), "order kept");
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        for (s, why) in [
            ("", "empty"),
            (" ", "empty"),
            ("0,", "not a CPU"),
            ("a", "not a CPU"),
            ("-1", "not a CPU"),
            ("3-1", "backwards"),
            ("0,0", "twice"),
            ("0-2,1", "twice"),
            ("0-99999", "too long"),
        ] {
            let e = parse_list(s).unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn cpus_outside_the_mask_are_refused() {
        assert_eq!(parse_checked("0-1", &[0, 1, 2]), Ok(Cores(vec![0, 1])));
        let e = parse_checked("1,99", &[0, 1, 2, 3, 5]).unwrap_err();
        assert!(e.contains("CPU 99 not available"), "{e}");
        assert!(e.contains("available: 0-3,5"), "{e}");
        // This process's own mask holds the CPU it runs on.
        let me = allowed().unwrap();
        assert!(!me.is_empty());
        assert!(parse(&me[0].to_string()).is_ok());
        assert!(parse("100000").is_err());
    }
}
