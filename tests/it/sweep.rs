//! `scripts/sweep.sh` on tiny settings: it trains and evaluates every variant into its own run
//! directory, writes the report (table and curves), and a second invocation skips finished work.

use std::path::Path;
use std::process::Command;

use crate::common::{Setup, text};

fn sweep(s: &Setup, variants: &Path, out: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/sweep.sh"))
        .args(["--config", s.config.to_str().unwrap(), "--variants", variants.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--stages", "sft,grpo", "--split", "val", "--limit", "3", "--"])
        .args(["--set", "sft.max_steps=2", "--set", "grpo.max_steps=2", "--set", "grpo.init_adapter=sft"])
        .env("REFINE_POI", env!("CARGO_BIN_EXE_refine-poi"))
        .output()
        .unwrap()
}

#[test]
fn a_sweep_trains_evaluates_reports_and_resumes() {
    let s = Setup::new();
    let variants = s.tmp.path().join("variants.txt");
    std::fs::write(&variants, "# two variants\nbase\n\nno-kl   --set grpo.beta=0   # no reference forward\n").unwrap();
    let out = s.tmp.path().join("sweep");
    let first = sweep(&s, &variants, &out);
    assert!(first.status.success(), "{}\n{}", text(&first.stdout), text(&first.stderr));
    for name in ["base", "no-kl"] {
        for f in ["sft/final/adapter_config.json", "grpo/final/adapter_config.json", "grpo/eval/val-3.json"] {
            assert!(out.join(name).join(f).is_file(), "{name}/{f} missing");
        }
    }
    let md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(md.contains("grpo.beta=0.04") && md.contains("grpo.beta=0") && md.contains("val-3"), "{md}");
    let csv = std::fs::read_to_string(out.join("report/report.csv")).unwrap();
    // Header + 2 runs x one evaluation (val-3; no validation during training) x 3 groups.
    assert_eq!(csv.lines().count(), 1 + 2 * 3, "{csv}");
    assert!(csv.lines().nth(1).unwrap().starts_with("base,grpo,grpo.beta=0.04,2,val-3,all,3,"), "{csv}");
    let svg = std::fs::read_to_string(out.join("report/curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("total reward") && svg.contains("no-kl"), "curves.svg lacks its panels");

    let again = sweep(&s, &variants, &out);
    let log = text(&again.stdout);
    assert!(again.status.success(), "{log}\n{}", text(&again.stderr));
    assert_eq!(log.matches("done, skipped").count(), 4, "{log}");
    assert_eq!(log.matches("exists, skipped").count(), 2, "{log}");

    // A bad variants file is one clear error.
    std::fs::write(&variants, "bad/name --set grpo.beta=0\n").unwrap();
    let bad = sweep(&s, &variants, &out);
    assert!(!bad.status.success() && text(&bad.stderr).contains("bad variant name"), "{}", text(&bad.stderr));
}

/// A sweep's output folder is locked while it runs: a second sweep there stops at once, naming
/// the holder (here the test process, holding the same kind of lock).
#[test]
fn a_second_sweep_on_the_same_folder_is_refused() {
    let s = Setup::new();
    let variants = s.tmp.path().join("variants.txt");
    std::fs::write(&variants, "base\n").unwrap();
    let out = s.tmp.path().join("sweep");
    let held = refine_poi::lock::DirLock::acquire(&out, "sweep.sh").unwrap();
    let second = sweep(&s, &variants, &out);
    let err = text(&second.stderr);
    assert!(
        !second.status.success() && err.contains("in use by another sweep") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(!out.join("base").exists(), "nothing was started");
    drop(held);
}
