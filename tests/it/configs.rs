//! Every shipped config loads and validates, and every ablation variant's overrides name real
//! keys with valid values: a typo in configs/ fails here, not an hour into a sweep.

use std::path::Path;

use refine_poi::train::config::RunConfig;

fn configs_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

#[test]
fn shipped_configs_load() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = RunConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(cfg.grpo.train.max_steps > 0 && cfg.sft.train.max_steps > 0, "{}: steps set", path.display());
            n += 1;
        }
    }
    assert!(n >= 3, "nyc, tky and gowalla-ca configs");
}

#[test]
fn ablation_variants_are_valid_overrides() {
    let base = configs_dir().join("nyc.toml");
    let mut names = std::collections::HashSet::new();
    for entry in std::fs::read_dir(configs_dir().join("ablations")).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap();
        for line in text.lines().map(|l| l.split('#').next().unwrap().trim()).filter(|l| !l.is_empty()) {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(names.insert(format!("{}/{}", entry.path().display(), words[0])), "duplicate variant {line}");
            let sets: Vec<String> = words[1..]
                .chunks(2)
                .map(|c| {
                    assert_eq!(c[0], "--set", "{line}");
                    c[1].to_string()
                })
                .collect();
            RunConfig::load(Some(&base), &sets).unwrap_or_else(|e| panic!("{line}: {e:#}"));
        }
    }
    assert!(names.len() >= 15);
}
