//! Replays every input the fuzzers start from (fuzz/seeds) and every input they found a
//! problem with (fuzz/regressions, added once fixed) through the same entry points
//! (`imgfs::fuzz_entry`), so that a fixed crash stays fixed without running a fuzzer.

use std::path::Path;

#[test]
fn fuzz_seeds_and_found_inputs_run_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, run) in imgfs::fuzz_entry::TARGETS {
        let mut ran = 0;
        for dir in ["seeds", "regressions"] {
            let dir = root.join(dir).join(target);
            for e in std::fs::read_dir(&dir).into_iter().flatten() {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| run(&data));
                assert!(outcome.is_ok(), "{target}: {} panics", path.display());
                ran += 1;
            }
        }
        assert!(ran > 0, "{target}: no seed or regression input found");
    }
}
