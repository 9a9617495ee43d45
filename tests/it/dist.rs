//! Data-parallel training ([`refine_poi::dist`]): under `mpirun -np 2` the SFT warm-up and GRPO
//! train the same adapter, within float tolerance, as one process with the same global batch
//! and seed, and a run resumes with another number of ranks. These need the binary built with
//! `--features mpi` and OpenMPI's `mpirun` (`.ci/run` installs both); the default build is
//! checked to refuse a launcher instead of training the run once per process.

use crate::common::{Setup, bin, text};

#[cfg(not(feature = "mpi"))]
#[test]
fn a_binary_without_mpi_refuses_a_launcher_with_several_processes() {
    let s = Setup::new();
    let out = bin().args(["sft-warmup", "--quiet", "--config"]).arg(&s.config).env("OMPI_COMM_WORLD_SIZE", "2").output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("2 processes") && err.contains("--features mpi"), "{err}");
    assert!(!s.tmp.path().join("runs/sft").exists(), "nothing is written");
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::*;
    use crate::common::{WARM_UP, adapter_f32, logged};

    /// `mpirun -np N` of the binary, as root if need be, oversubscribing the 2-core machine.
    fn mpirun(n: usize) -> Command {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &n.to_string()])
            // Containers often forbid the cross-memory attach of OpenMPI's shared-memory path.
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .arg(env!("CARGO_BIN_EXE_refine-poi"));
        c
    }

    fn train(mut c: Command, stage: &str, config: &Path, run_dir: &Path, extra: &[&str]) {
        let out = c
            .args([stage, "--quiet", "--config"])
            .arg(config)
            .arg("--set")
            .arg(format!("run_dir=\"{}\"", run_dir.display()))
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{stage} {extra:?}: {}\n{}", text(&out.stdout), text(&out.stderr));
    }

    /// Every tensor equal within `tol` relative to the tensor's largest value.
    fn assert_same_adapter(a: &Path, b: &Path, tol: f32) {
        let (a, b) = (adapter_f32(&a.join("final")), adapter_f32(&b.join("final")));
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(diff <= tol * scale, "{name}: max difference {diff} (scale {scale})");
        }
    }

    /// Training moved the adapter in `stage_dir` away from `start` (so that equality is not
    /// that of two untouched adapters).
    fn assert_moved(start: &Path, stage_dir: &Path) {
        let moved = adapter_f32(start)
            .iter()
            .zip(adapter_f32(&stage_dir.join("final")))
            .any(|((_, x), (_, y))| x.iter().zip(&y).any(|(p, q)| (p - q).abs() > 1e-4));
        assert!(moved, "{} did not train", stage_dir.display());
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * x.abs().max(1.0))
    }

    #[test]
    fn two_ranks_train_what_one_process_trains_and_resume_with_another_count() {
        let s = Setup::new();
        let runs = |name: &str| -> PathBuf { s.tmp.path().join(name) };
        // SFT: 2 micro-batches of 2 examples per step, dropout on (the same masks either way).
        let one = runs("sft-1");
        train(bin(), "sft-warmup", &s.config, &one, &[]);
        let two = runs("sft-2");
        train(mpirun(2), "sft-warmup", &s.config, &two, &[]);
        assert_moved(&one.join("sft/checkpoints/step-4"), &one.join("sft"));
        assert_same_adapter(&one.join("sft"), &two.join("sft"), 1e-4);
        assert!(close(&logged(&one.join("sft"), "loss"), &logged(&two.join("sft"), "loss"), 1e-5));
        assert_eq!(logged(&two.join("sft"), "ranks"), vec![2.0; 6], "rank 0 alone logs, once per step");

        // GRPO, from a warm-up that teaches `<answer>id</answer>` so that rewards differ within a
        // group (a random tiny model never writes an answer tag): 2 prompts per step, one per
        // rank; the rewards are gathered for the log.
        let warm = runs("warm");
        let sets: Vec<String> = WARM_UP.iter().flat_map(|s| ["--set".to_string(), s.to_string()]).collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        train(bin(), "sft-warmup", &s.config, &warm, &sets);
        let init = format!("grpo.init_adapter=\"{}\"", warm.join("sft/final").display());
        let grpo = ["--set", &init];
        let one = runs("grpo-1");
        train(bin(), "grpo-train", &s.config, &one, &grpo);
        assert_moved(&warm.join("sft/final"), &one.join("grpo"));
        let two = runs("grpo-2");
        train(mpirun(2), "grpo-train", &s.config, &two, &grpo);
        assert_same_adapter(&one.join("grpo"), &two.join("grpo"), 1e-4);
        assert!(close(&logged(&one.join("grpo"), "reward"), &logged(&two.join("grpo"), "reward"), 1e-9));
        assert!(close(&logged(&one.join("grpo"), "loss"), &logged(&two.join("grpo"), "loss"), 1e-4));

        // Two steps on 2 ranks, then the rest on 1 process, then (SFT) on 3 ranks: the same run.
        let mixed = runs("grpo-mixed");
        train(mpirun(2), "grpo-train", &s.config, &mixed, &[&grpo[..], &["--stop-after", "2"]].concat());
        train(bin(), "grpo-train", &s.config, &mixed, &[&grpo[..], &["--resume"]].concat());
        assert_same_adapter(&one.join("grpo"), &mixed.join("grpo"), 1e-4);
        let mixed = runs("sft-mixed");
        train(bin(), "sft-warmup", &s.config, &mixed, &["--stop-after", "3"]);
        train(mpirun(3), "sft-warmup", &s.config, &mixed, &["--resume"]);
        assert_same_adapter(&runs("sft-1").join("sft"), &mixed.join("sft"), 1e-4);
    }

    #[test]
    fn an_error_on_rank_zero_ends_every_rank() {
        let s = Setup::new();
        // A run directory that holds a run already: rank 0 refuses a fresh start, and the
        // other rank must not wait for it forever.
        let dir = s.tmp.path().join("taken");
        train(bin(), "sft-warmup", &s.config, &dir, &["--stop-after", "1"]);
        let out = mpirun(2)
            .args(["sft-warmup", "--quiet", "--config"])
            .arg(&s.config)
            .arg("--set")
            .arg(format!("run_dir=\"{}\"", dir.display()))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("already holds a run"), "{err}");
    }
}
