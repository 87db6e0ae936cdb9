//! examples/kv.c compiled with `cc` against include/rtrs.h and librtrs.so,
//! then run: a C server with a handler callback (deferred GETs completed
//! from its own thread) and a C client submitting from two threads, over
//! shm. Skipped, saying so, where no C compiler is found.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds librtrs.so (cargo builds only the rlib for tests) into this
/// test's target directory and returns where it is (target/debug).
fn build_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/debug/deps/c_example-<hash>
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the target directory")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", "rtrs-capi", "--lib", "--target-dir"])
        .arg(&target)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p rtrs-capi failed");
    target.join("debug")
}

#[test]
fn the_c_example_builds_and_runs() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        eprintln!("SKIP: no C compiler ({cc}); install build-essential to run the C example");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = build_lib();
    assert!(
        lib.join("librtrs.so").exists(),
        "no librtrs.so in {}",
        lib.display()
    );
    let out = std::env::temp_dir().join(format!("rtrs-kv-c-{}", std::process::id()));
    let status = Command::new(&cc)
        .args(["-Wall", "-Wextra", "-Werror", "-O2"])
        .arg(dir.join("examples/kv.c"))
        .arg("-I")
        .arg(dir.join("include"))
        .arg("-L")
        .arg(&lib)
        .arg("-lrtrs")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lpthread")
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed on examples/kv.c");
    let mut child = Command::new(&out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the C example");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the C example") {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            // Stopped by its PID (it busy-polls a core).
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_file(&out);
    let mut text = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut text);
    }
    let status = status.expect("the C example ran over 60 s and was killed");
    assert!(status.success(), "the C example failed ({status}): {text}");
    assert!(text.contains("checked"), "unexpected output: {text}");
    println!("{text}");
}
