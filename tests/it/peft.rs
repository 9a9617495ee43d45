//! Adapters made with Python PEFT (`scripts/make-peft-fixture.py`, fixtures in
//! `tests/fixtures/peft_patterns/`) give PEFT's logits here: `alpha_pattern`, `rank_pattern`,
//! `layers_to_transform`, a regex `target_modules`, rsLoRA with a pattern rank. Saved again by
//! this tool, each keeps PEFT's key layout and its logits.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use refine_poi::model::{AdapterBase, LoadedModel, Mode, ModelSource, load_on};
use serde_json::Value;

const ADAPTERS: [&str; 5] = ["alpha_pattern", "rank_pattern", "layers", "regex", "rslora"];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_patterns")
}

fn base() -> LoadedModel {
    load_on(&ModelSource::Folder(fixture().join("base")), &Device::Cpu, DType::F32).unwrap()
}

/// Logits at the fixture's two positions.
fn logits_at(m: &LoadedModel, expected: &Value, mode: Mode) -> Vec<(String, Vec<f32>)> {
    let ids: Vec<u32> = expected["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let rows = m.model.forward(&t, None, None, mode).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    ["pos3", "last"].iter().map(|k| (k.to_string(), rows[expected["positions"][k].as_u64().unwrap() as usize].clone())).collect()
}

fn assert_close(got: &[(String, Vec<f32>)], want: &Value, what: &str) {
    for (pos, row) in got {
        let want: Vec<f32> = want[pos].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let diff = row.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{what} at {pos}: max |logit - PEFT's| = {diff}");
    }
}

fn tensor_keys(dir: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys: Vec<(String, Vec<usize>)> = st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
    keys.sort();
    keys
}

#[test]
fn peft_adapters_with_patterns_give_pefts_logits_and_round_trip() {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap();
    let mut m = base();
    assert_close(&logits_at(&m, &expected, Mode::REFERENCE), &expected["base"], "base");
    for name in ADAPTERS {
        let want = &expected["adapters"][name];
        m.model.load_adapter(&fixture().join(name)).unwrap();
        assert_close(&logits_at(&m, &expected, Mode::INFERENCE), want, name);
        // The adapter really changes the output (so the check above is not the base's).
        assert!(want["max_abs_diff_vs_base"].as_f64().unwrap() > 0.5, "{name}");

        // Saved by this tool: PEFT's keys and shapes, and the same logits once reloaded.
        let out = tempfile::tempdir().unwrap();
        m.model.save_adapter(out.path(), &AdapterBase { repo: Some("owner/tiny".into()), source: "fixture".into() }).unwrap();
        let mut want_keys: Vec<(String, Vec<usize>)> = want["keys"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
            .collect();
        want_keys.sort();
        assert_eq!(tensor_keys(out.path()), want_keys, "{name}");
        let mut again = base();
        again.model.load_adapter(out.path()).unwrap();
        // What `[lora]` is checked against when a run starts from it is unchanged too.
        assert_eq!(again.model.lora_config, m.model.lora_config, "{name}");
        assert_close(&logits_at(&again, &expected, Mode::INFERENCE), want, &format!("{name}, saved and reloaded"));
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["base_model_name_or_path"], "owner/tiny");
    }
}

#[test]
fn an_adapter_with_a_key_this_reader_does_not_apply_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture().join("alpha_pattern").join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["exclude_modules"] = serde_json::json!(["down_proj"]);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = format!("{:#}", base().model.load_adapter(dir.path()).unwrap_err());
    assert!(e.contains("exclude_modules") && e.contains("not supported"), "{e}");
}
