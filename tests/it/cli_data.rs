//! Drives the `refine-poi` binary through `preprocess` and `eval` on the fixtures in
//! `tests/fixtures`, bad inputs included.

use std::path::{Path, PathBuf};
use std::process::Output;

use refine_poi::data::{Dataset, Split};

use crate::common::{error_line, run, text};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn preprocess(format: &str, input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["preprocess", "--format", format, "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    run(&args)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn preprocess_then_eval_every_baseline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("syn");
    let out = preprocess("foursquare", &fixture("tsmc2014_synthetic.txt"), &data, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in ["pois.csv", "users.csv", "checkins.csv", "train.jsonl", "val.jsonl", "test.jsonl", "stats.json"] {
        assert!(data.join(f).is_file(), "{f} missing");
    }
    let stats = json(&data.join("stats.json"));
    for k in ["users", "pois", "categories", "checkins"] {
        assert!(stats[k].as_u64().unwrap() > 0, "{k}");
    }
    for s in ["train", "val", "test"] {
        assert!(stats["trajectories"][s].as_u64().unwrap() > 0);
        assert!(stats["instances"][s].as_u64().unwrap() > 0);
        assert!(stats["return_share"][s].as_f64().unwrap() > 0.0);
    }
    assert!(stats["input"]["skipped"].as_object().unwrap().is_empty());
    assert!(stats["dropped_instances"]["test"]["user_not_in_train"].is_u64());
    // The "Café" category of the fixture is Latin-1: decoded lossily, not fatal.
    let pois = std::fs::read_to_string(data.join("pois.csv")).unwrap();
    assert!(pois.contains("Caf\u{fffd}"));

    // The library loads what the binary wrote.
    let ds = Dataset::load(&data).unwrap();
    assert_eq!(ds.instances(Split::Test).len() as u64, stats["instances"]["test"].as_u64().unwrap());
    for inst in ds.instances(Split::Test) {
        let h = ds.history(inst);
        assert!(h.iter().all(|c| c.utc < inst.target.utc));
        assert!(ds.user_checkins(inst.user)[h.len()..].iter().all(|c| c.utc >= inst.target.utc));
    }

    for split in ["test", "val"] {
        for method in ["popularity", "counter", "markov", "counter-hour", "ranker"] {
            let report = tmp.path().join(format!("{method}-{split}.json"));
            let preds = tmp.path().join(format!("{method}-{split}.jsonl"));
            let out = run(&[
                "eval",
                "--data",
                data.to_str().unwrap(),
                "--split",
                split,
                "--method",
                method,
                "--out",
                report.to_str().unwrap(),
                "--predictions",
                preds.to_str().unwrap(),
                "--quiet",
            ]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let table = text(&out.stdout);
            assert!(table.contains("Acc@1") && table.contains("discovery"), "{table}");
            let r = json(&report);
            assert_eq!(r["method"], method);
            assert_eq!(r["split"], split);
            let n = r["instances"].as_u64().unwrap();
            assert_eq!(n, stats["instances"][split].as_u64().unwrap());
            let m = &r["metrics"];
            for g in ["all", "return", "discovery"] {
                for k in ["acc@1", "acc@5", "acc@10", "ndcg@5", "ndcg@10", "mrr"] {
                    let v = &m[g][k];
                    assert!(v.is_null() || (0.0..=1.0).contains(&v.as_f64().unwrap()), "{g}.{k} = {v}");
                }
            }
            assert_eq!(m["all"]["n"].as_u64().unwrap(), n);
            assert_eq!(m["return"]["n"].as_u64().unwrap() + m["discovery"]["n"].as_u64().unwrap(), n);
            let acc = |k: &str| m["all"][k].as_f64().unwrap();
            assert!(acc("acc@1") <= acc("acc@5") && acc("acc@5") <= acc("acc@10"));
            let lines: Vec<serde_json::Value> =
                std::fs::read_to_string(&preds).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            assert_eq!(lines.len() as u64, n);
            for l in &lines {
                assert!(l["ranked"].as_array().unwrap().len() <= 20);
                // A hit within the list has its rank where the list says (ties aside).
                if let Some(r) = l["rank"].as_f64() {
                    assert!(r >= 1.0);
                }
            }
        }
    }
    // The counter beats popularity on the synthetic data (users revisit favourites).
    let mrr = |m: &str| json(&tmp.path().join(format!("{m}-test.json")))["metrics"]["all"]["mrr"].as_f64().unwrap();
    assert!(mrr("counter") > mrr("popularity"));
    // Every group's metrics come with their 95% bootstrap interval around them.
    let all = &json(&tmp.path().join("counter-test.json"))["metrics"]["all"];
    for k in ["acc@1", "acc@10", "mrr"] {
        let (lo, hi) = (all["ci95"][k][0].as_f64().unwrap(), all["ci95"][k][1].as_f64().unwrap());
        assert!(lo <= all[k].as_f64().unwrap() && all[k].as_f64().unwrap() <= hi, "{k}: {all}");
    }

    // The ranker also recommends for one dataset user, from the same fit.
    let user = std::fs::read_to_string(data.join("users.csv")).unwrap().lines().nth(1).unwrap().split(',').nth(1).unwrap().to_string();
    let out = run(&["recommend", "--data", data.to_str().unwrap(), "--user", &user, "--method", "ranker", "--top", "3", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["method"], "ranker");
    assert_eq!(r["recommendations"].as_array().unwrap().len(), 3, "{r}");
    // A bad ranker option is one clear error.
    let bad = tmp.path().join("bad-ranker.toml");
    std::fs::write(&bad, "[ranker]\nnegatives = 0\n").unwrap();
    let report = tmp.path().join("bad.json");
    let out = run(&[
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--method",
        "ranker",
        "--ranker-config",
        bad.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(error_line(&out).contains("ranker.negatives"), "{}", text(&out.stderr));

    // Paired comparison of two methods' predictions on the same instances.
    let p = |m: &str, split: &str| tmp.path().join(format!("{m}-{split}.jsonl")).to_str().unwrap().to_string();
    let cmp_out = tmp.path().join("compare.json");
    let out = run(&["eval", "--compare", &p("counter", "test"), &p("popularity", "test"), "--out", cmp_out.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("95% CI"), "{}", text(&out.stdout));
    let c = json(&cmp_out);
    let d = &c["groups"]["all"][1]["mrr"];
    assert!((d["diff"].as_f64().unwrap() - (mrr("counter") - mrr("popularity"))).abs() < 1e-9, "{c}");
    // Predictions of different splits are refused with one clear error.
    let out = run(&["eval", "--compare", &p("counter", "test"), &p("counter", "val")]);
    assert!(error_line(&out).contains("cover different instances"), "{}", text(&out.stderr));
}

#[test]
fn preprocess_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&a, &b] {
        let out = preprocess("foursquare", &fixture("tsmc2014_synthetic.txt"), d, &[]);
        assert!(out.status.success());
    }
    for f in ["pois.csv", "users.csv", "checkins.csv", "train.jsonl", "test.jsonl"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn csv_gzip_and_gowalla_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("csv");
    let small = ["--min-user", "1", "--min-poi", "1"];
    let out = preprocess("csv", &fixture("checkins_sample.csv.gz"), &d, &small);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The malformed row is skipped, counted, and reported with its line.
    let stats = json(&d.join("stats.json"));
    assert_eq!(stats["input"]["skipped"]["bad_coordinates"]["count"], 1);
    assert_eq!(stats["input"]["skipped"]["bad_coordinates"]["first_lines"][0], 4);
    let err = text(&out.stderr);
    assert!(err.contains("bad_coordinates: 1 row (line 4)"), "{err}");

    let d = tmp.path().join("gowalla");
    let cats = fixture("gowalla_categories.csv");
    let mut args = small.to_vec();
    args.extend(["--categories", cats.to_str().unwrap(), "--bbox", "32.5,-124.5,42.0,-114.0", "--tz-offset-min", "-480"]);
    let out = preprocess("gowalla", &fixture("gowalla_sample.txt"), &d, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats = json(&d.join("stats.json"));
    assert_eq!(stats["input"]["rows_outside_bbox"], 3);
    let pois = std::fs::read_to_string(d.join("pois.csv")).unwrap();
    assert!(pois.contains("1040966,\"Parks, Outdoors\""), "{pois}");
}

#[test]
fn bad_inputs_fail_with_one_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");

    let e = error_line(&preprocess("csv", &tmp.path().join("missing.csv"), &out_dir, &[]));
    assert!(e.contains("cannot open input file") && e.contains("missing.csv"), "{e}");

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let e = error_line(&preprocess("foursquare", &empty, &out_dir, &[]));
    assert!(e.contains("empty"), "{e}");

    let e = error_line(&preprocess("foursquare", &fixture("tsmc2014_sample.txt"), &out_dir, &["--strict"]));
    assert!(e.contains("line 6"), "{e}");

    // Default 10-core on an 8-row file: nothing is left.
    let e = error_line(&preprocess("foursquare", &fixture("tsmc2014_sample.txt"), &out_dir, &[]));
    assert!(e.contains("nothing left after the k-core filter"), "{e}");

    let e = error_line(&preprocess("csv", &fixture("tsmc2014_sample.txt"), &out_dir, &[]));
    assert!(e.contains("lacks column"), "{e}");

    let e = error_line(&preprocess("csv", &fixture("checkins_sample.csv"), &out_dir, &["--split", "0.9,0.2"]));
    assert!(e.contains("exceed 1"), "{e}");

    // Unknown format and split: clap's own message, still an `error:` line and no panic.
    let out = preprocess("parquet", &fixture("checkins_sample.csv"), &out_dir, &[]);
    let e = error_line(&out);
    assert!(e.contains("parquet"), "{e}");

    let e = error_line(&run(&[
        "eval",
        "--data",
        tmp.path().join("nope").to_str().unwrap(),
        "--method",
        "counter",
        "--out",
        tmp.path().join("r.json").to_str().unwrap(),
    ]));
    assert!(e.contains("does not exist"), "{e}");

    let e = error_line(&run(&["eval", "--data", "x", "--split", "train", "--method", "counter", "--out", "r.json"]));
    assert!(e.contains("train"), "{e}");
    assert!(!out_dir.join("stats.json").exists());
}

#[test]
fn eval_rejects_a_corrupt_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("syn");
    assert!(preprocess("foursquare", &fixture("tsmc2014_synthetic.txt"), &data, &[]).status.success());
    std::fs::write(data.join("test.jsonl"), b"{\"id\": 0, \"user\": \n").unwrap();
    let e = error_line(&run(&[
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--method",
        "markov",
        "--out",
        tmp.path().join("r.json").to_str().unwrap(),
    ]));
    assert!(e.contains("test.jsonl line 1"), "{e}");
}

/// `preprocess` locks the dataset directory it writes: a second writer stops at once.
#[test]
fn preprocess_refuses_a_dataset_directory_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let held = refine_poi::lock::DirLock::acquire(&data, "preprocess").unwrap();
    let out = preprocess("foursquare", &fixture("tsmc2014_synthetic.txt"), &data, &[]);
    let e = error_line(&out);
    assert!(e.contains("in use by another run") && e.contains("preprocess"), "{e}");
    assert!(!data.join("pois.csv").exists());
    drop(held);
    // Released, the directory is free again. The other tests of this process spawn binaries
    // meanwhile, and a child between fork and exec shares the lock's open file for a moment,
    // which keeps the flock held until its exec: so allow a few short waits.
    let mut last = String::new();
    let freed = (0..20).any(|_| {
        let out = preprocess("foursquare", &fixture("tsmc2014_synthetic.txt"), &data, &[]);
        last = text(&out.stderr);
        out.status.success() || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            false
        }
    });
    assert!(freed, "{last}");
}
