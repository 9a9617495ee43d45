//! scripts/device-check.sh's packing: the binary and the default model go to the GPU machine in
//! parts under the carry limit, and come back together intact, or not at all.

use std::path::Path;
use std::process::Command;

fn script(stash: &Path, args: &[&str]) -> std::process::Output {
    Command::new("bash").arg("scripts/device-check.sh").args(args).env("DEVICE_STASH", stash).output().expect("bash runs")
}

#[test]
fn packed_parts_unpack_to_the_same_binary_and_model_and_a_damaged_part_is_refused() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join(refine_poi::model::DEFAULT_MODEL);
    if !model.exists() {
        assert!(std::env::var("CI").is_err(), "CI must fetch the default model (scripts/fetch-model.sh)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let stash = tmp.path().join("stash");
    let bin = env!("CARGO_BIN_EXE_refine-poi");
    let out = script(&stash, &["pack", "--binary", bin, "--piece-mib", "30"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let mut parts: Vec<_> =
        std::fs::read_dir(&stash).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().contains("part-")).collect();
    parts.sort();
    assert!(parts.len() >= 3, "98 MB of model in parts of 30 MiB: {printed}");
    for p in &parts {
        assert!(std::fs::metadata(p).unwrap().len() <= 30 << 20);
    }
    // One call per part, the last one running the check.
    assert_eq!(printed.matches("carry=").count(), parts.len(), "{printed}");
    assert!(printed.lines().last().unwrap().contains("device-check.sh run --device cuda"), "{printed}");

    let into = tmp.path().join("unpacked");
    let out = script(&stash, &["unpack", into.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(into.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap(), std::fs::read(&model).unwrap());
    let version = Command::new(into.join("refine-poi")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("refine-poi "));

    // With a codebook: it travels in the bundle, and the last call trains (run --semantic).
    let codebook = tmp.path().join("codebook.json");
    std::fs::write(&codebook, "{\"levels\": 3}").unwrap();
    let with = tmp.path().join("stash-codebook");
    let out = script(&with, &["pack", "--binary", bin, "--codebook", codebook.to_str().unwrap(), "--piece-mib", "60"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.lines().last().unwrap().contains("device-check.sh run --device cuda --semantic"), "{printed}");
    let into_cb = tmp.path().join("unpacked-codebook");
    assert!(script(&with, &["unpack", into_cb.to_str().unwrap()]).status.success());
    assert_eq!(std::fs::read(into_cb.join("codebook.json")).unwrap(), std::fs::read(&codebook).unwrap());
    let out = script(&with, &["pack", "--binary", bin, "--codebook", tmp.path().join("none.json").to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no codebook at"));

    // A part cut short in transit, or missing: refused with one message, nothing run.
    let first = std::fs::read(&parts[0]).unwrap();
    std::fs::write(&parts[0], &first[..first.len() - 1]).unwrap();
    let out = script(&stash, &["unpack", tmp.path().join("again").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a carried part is missing or damaged"));
    std::fs::remove_file(&parts[0]).unwrap();
    let out = script(&stash, &["unpack", tmp.path().join("again").to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("missing or damaged"));
}
