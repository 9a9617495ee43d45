//! Runs under the conditions a cluster job meets: a second writer on the same run directory,
//! SIGTERM / SIGUSR1 from the scheduler, SIGKILL at any moment, a full or read-only disk, and
//! a loss that turns non-finite. Each leaves a run that resumes to the result of an
//! uninterrupted one, or stops with one clear error.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use refine_poi::train::checkpoint::verify_manifest;
use refine_poi::train::sft;

use crate::common::{Setup, adapter_tensors, bin, quiet, text};

/// A training command on the setup's config with extra `--set`s.
fn train(s: &Setup, stage: &str, sets: &[&str], resume: bool) -> Command {
    let mut cmd = bin();
    cmd.args([stage, "--config", s.config.to_str().unwrap(), "--quiet"]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    if resume {
        cmd.arg("--resume");
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

fn stage_dir(s: &Setup, stage: &str) -> PathBuf {
    s.tmp.path().join("runs").join(if stage == "sft-warmup" { "sft" } else { "grpo" })
}

/// The metrics log without its timing fields (which differ between runs).
fn records(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| !(k.ends_with("_s") || k == "time"));
            }
            v
        })
        .collect()
}

/// Waits until `dir`'s log has `n` lines (or the child ended).
fn wait_for_steps(child: &mut Child, dir: &Path, n: usize) {
    let start = Instant::now();
    while records(dir).len() < n && child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sends a signal to a child process this test started and has not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Resumes `stage` until it finishes (a kill before the first checkpoint leaves nothing to
/// resume, which starts afresh).
fn finish(s: &Setup, stage: &str, sets: &[&str]) {
    let dir = stage_dir(s, stage);
    let resume = dir.join("config.toml").is_file();
    let out = train(s, stage, sets, resume).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_second_writer_is_refused_and_the_first_run_loses_nothing() {
    let s = Setup::new();
    let sets = ["sft.max_steps=60", "sft.save_every=10"];
    let dir = stage_dir(&s, "sft-warmup");
    let mut first = train(&s, "sft-warmup", &sets, false).spawn().unwrap();
    wait_for_steps(&mut first, &dir, 1);
    for resume in [false, true] {
        let out = train(&s, "sft-warmup", &sets, resume).output().unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "a second writer ran: {err}");
        assert!(
            err.contains("in use by another run") && err.contains(&format!("pid {}", first.id())) && err.contains("sft-warmup"),
            "{err}"
        );
    }
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let steps: Vec<u64> = records(&dir).iter().filter_map(|r| r["step"].as_u64()).collect();
    assert_eq!(steps, (1..=60).collect::<Vec<_>>(), "every step is logged once");
}

/// SIGTERM (scancel, preemption) and SIGUSR1 (Slurm's warning) mid-run: a checkpoint of the
/// last completed step, exit status 128 + the signal, and `--resume` ends where an
/// uninterrupted run ends.
#[test]
fn sigterm_and_sigusr1_checkpoint_and_resume_exactly() {
    for (stage, sets, sig) in [
        ("sft-warmup", vec!["sft.max_steps=40", "sft.save_every=100"], libc::SIGTERM),
        ("grpo-train", vec!["grpo.max_steps=12", "grpo.save_every=100"], libc::SIGUSR1),
    ] {
        let straight = Setup::new();
        finish(&straight, stage, &sets);
        let s = Setup::new();
        let dir = stage_dir(&s, stage);
        let mut child = train(&s, stage, &sets, false).spawn().unwrap();
        wait_for_steps(&mut child, &dir, 2);
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(128 + sig), "{stage}: {}", text(&out.stderr));
        let last = std::fs::read_to_string(dir.join("checkpoints/last")).unwrap();
        let logged = records(&dir).len();
        assert!(logged >= 2 && last.trim() == format!("step-{logged}"), "{stage}: checkpoint {last} after {logged} steps");
        assert!(verify_manifest(&dir.join("checkpoints").join(last.trim())).unwrap());
        finish(&s, stage, &sets);
        assert_eq!(adapter_tensors(&stage_dir(&straight, stage).join("final")), adapter_tensors(&dir.join("final")), "{stage}");
        assert_eq!(records(&stage_dir(&straight, stage)), records(&dir), "{stage}");
    }
}

/// SIGKILL at random moments, then `--resume` until done: the final adapter and the log equal
/// an uninterrupted run's. `REFINE_POI_KILL_TRIALS` sets the trials per stage (3 by default).
#[test]
fn sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run() {
    let trials: usize = std::env::var("REFINE_POI_KILL_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    for (stage, sets) in
        [("sft-warmup", vec!["sft.max_steps=12", "sft.save_every=3"]), ("grpo-train", vec!["grpo.max_steps=6", "grpo.save_every=2"])]
    {
        let straight = Setup::new();
        let started = Instant::now();
        finish(&straight, stage, &sets);
        let whole = started.elapsed();
        let want = (adapter_tensors(&stage_dir(&straight, stage).join("final")), records(&stage_dir(&straight, stage)));
        for trial in 0..trials {
            let s = Setup::new();
            let mut child = train(&s, stage, &sets, false).spawn().unwrap();
            let at = whole.mul_f64(rng.random_range(0.05..0.95));
            std::thread::sleep(at);
            signal(&child, libc::SIGKILL);
            let status = child.wait().unwrap();
            finish(&s, stage, &sets);
            let dir = stage_dir(&s, stage);
            let got = (adapter_tensors(&dir.join("final")), records(&dir));
            assert!(got == want, "{stage}, trial {trial}: killed after {at:?} ({status:?}), the resumed run differs");
        }
    }
}

/// A training step whose loss is not finite skips its update; five in a row stop the run with
/// one clear error, and the checkpoints keep the last good adapter.
#[test]
fn non_finite_steps_are_skipped_counted_and_stop_the_run() {
    let s = Setup::new();
    let cfg = s.cfg(&["sft.lr=1e38", "sft.warmup_steps=0", "sft.max_grad_norm=0", "sft.max_steps=20", "sft.save_every=1"]);
    let e = format!("{:#}", sft::run(&cfg, &quiet()).unwrap_err());
    assert!(e.contains("non-finite") && e.contains("5 steps in a row"), "{e}");
    let dir = stage_dir(&s, "sft-warmup");
    let log = records(&dir);
    let skipped = log.iter().filter(|r| r["skipped_nonfinite"] == true).count();
    assert_eq!(skipped, 5, "{log:?}");
    assert_eq!(log.iter().rev().take(5).filter(|r| r["skipped_nonfinite"] == true).count(), 5);
    // The newest checkpoint is intact and records the skipped steps.
    let last = std::fs::read_to_string(dir.join("checkpoints/last")).unwrap();
    let ckpt = dir.join("checkpoints").join(last.trim());
    assert!(verify_manifest(&ckpt).unwrap());
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    assert!(state["nonfinite_steps"].as_u64().unwrap() >= 4, "{state}");
}

/// A small filesystem of its own for the run directory (root only; skipped, and said so,
/// where mounting is not allowed).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn remount(&self, opts: &str) {
        assert!(Command::new("mount").args(["-o", &format!("remount,{opts}")]).arg(&self.0).status().unwrap().success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk and a read-only one during a checkpoint: one clear error, a non-zero exit, and
/// the previous checkpoint intact, from which the run resumes once there is room.
#[test]
fn a_full_or_read_only_disk_keeps_the_previous_checkpoint() {
    let s = Setup::new();
    let Some(fs) = Tmpfs::mount(&s.tmp.path().join("runs"), "2m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let dir = stage_dir(&s, "sft-warmup");
    let sets = ["sft.max_steps=6", "sft.save_every=2", "sft.keep_checkpoints=0"];
    let out = train(&s, "sft-warmup", &sets, false).args(["--stop-after", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let good = dir.join("checkpoints/step-2");
    assert!(verify_manifest(&good).unwrap());

    // Fill the disk, leaving less than a checkpoint's worth.
    let filler = fs.0.join("filler");
    let free = || {
        // SAFETY: statvfs fills the struct it is given.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let path = std::ffi::CString::new(fs.0.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    };
    std::fs::write(&filler, vec![0u8; free().saturating_sub(8 << 10) as usize]).unwrap();
    for (what, setup) in [("full", None), ("read-only", Some("ro"))] {
        if let Some(opts) = setup {
            std::fs::remove_file(&filler).unwrap();
            fs.remount(opts);
        }
        let out = train(&s, "sft-warmup", &sets, true).output().unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{what}: {err}");
        assert!(err.contains("No space left") || err.contains("Read-only"), "{what}: {err}");
        if what == "full" {
            assert!(err.contains("cannot write the checkpoint of step 4") && err.contains("step-2 is intact"), "{err}");
        }
        assert!(verify_manifest(&good).unwrap());
    }
    fs.remount("rw");
    finish(&s, "sft-warmup", &sets);
    assert!(dir.join("final/adapter_model.safetensors").is_file());
}
