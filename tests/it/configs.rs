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
            let steps = |t: &refine_poi::train::schedule::TrainConfig| t.max_steps > 0 || t.epochs > 0;
            assert!(steps(&cfg.grpo.train) && steps(&cfg.sft.train), "{}: steps set", path.display());
            n += 1;
        }
    }
    assert!(n >= 3, "nyc, tky and gowalla-ca configs");
}

#[test]
fn ablation_variants_are_valid_overrides() {
    // The ablations vary the raw-id list recipe: its reward terms, k, G, the prompt's lists.
    let base = configs_dir().join("nyc-raw.toml");
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

/// configs/nyc.toml is the recipe of the shipped NYC adapters: its SFT stage resolves to what
/// adapters/nyc recorded, its GRPO stage to what adapters/nyc-grpo recorded, and both stages
/// rank by the next code. Only paths and the validation cadence differ: the shipped runs were
/// validated by separate `eval --beam-next 20` runs on the val sample of 200. And the history
/// window: the adapters' next-code prompts showed the latest check-ins (the default then), the
/// recipe's are anchored since the twenty-sixth session (chosen on the full val split).
#[test]
fn the_nyc_config_is_the_shipped_adapters_recipe() {
    use refine_poi::train::config::Stage;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = RunConfig::load(Some(&configs_dir().join("nyc.toml")), &[]).unwrap();
    let cadence = ["eval_every", "eval_instances", "eval_batch_size", "init_adapter", "history_window"];
    let section = |t: &toml::Table, name: &str| {
        let mut s = t[name].as_table().unwrap_or_else(|| panic!("no [{name}]")).clone();
        for k in cadence {
            s.remove(k);
        }
        s
    };
    for (stage, adapter, sections) in [
        (Stage::Sft, "adapters/nyc", &["preprocess", "prompt", "lora", "sft"][..]),
        (Stage::Grpo, "adapters/nyc-grpo", &["preprocess", "prompt", "lora", "grpo", "rewards"][..]),
    ] {
        let ours: toml::Table = toml::from_str(&cfg.stage_toml(stage).unwrap()).unwrap();
        let shipped: toml::Table =
            toml::from_str(&std::fs::read_to_string(root.join(adapter).join("training-config.toml")).unwrap()).unwrap();
        for name in sections {
            assert_eq!(section(&ours, name), section(&shipped, name), "[{name}] of {adapter}");
        }
        assert_eq!(ours["data"]["train_instances"], shipped["data"]["train_instances"], "{adapter}");
        assert_eq!(cfg.next_code_beams(stage), Some(20), "{adapter} ranks by the next code");
    }
    assert_eq!(cfg.prompt.history_window, refine_poi::prompt::HistoryWindow::Anchored);
    let prompt: toml::Table = toml::from_str(&std::fs::read_to_string(root.join("adapters/nyc/prompt.toml")).unwrap()).unwrap();
    let ours = toml::Table::try_from(&cfg.prompt).unwrap();
    for (key, value) in prompt["prompt"].as_table().unwrap() {
        if key == "history_window" {
            assert_eq!(value.as_str(), Some("latest"), "the shipped adapters were evaluated with the latest check-ins");
            continue;
        }
        assert_eq!(ours.get(key), Some(value), "prompt.{key}");
    }
    let raw = RunConfig::load(Some(&configs_dir().join("nyc-raw.toml")), &[]).unwrap();
    assert_eq!((raw.next_code_beams(Stage::Sft), raw.next_code_beams(Stage::Grpo)), (None, None), "raw ids write lists");
}
