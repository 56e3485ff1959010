use std::path::Path;

use crate::cli::{ok, potluck, text};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `potluck` with `words` (split at spaces) followed by `more`.
fn run(words: &str, more: &[&str]) -> String {
    let mut args: Vec<&str> = words.split_whitespace().collect();
    args.extend_from_slice(more);
    ok(&args)
}

#[test]
fn prepare_train_resume_generate_and_eval_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tiny = "--images 256 --vq-steps 20 --vq-batch 8 --held-out 8 --vq-images 64 \
                --vq-channels 8 --codebook 64";
    run(
        &format!("prepare --dataset shapes {tiny}"),
        &["--out", s(&data)],
    );
    let ckpt = dir.path().join("ckpt");
    let train = |extra: &str| {
        let words = format!("train --solo --config tiny --batch-size 8 {extra}");
        run(&words, &["--data", s(&data), "--out", s(&ckpt)])
    };
    let out = train("--steps 6 --micro-batch 4 --warmup 2");
    assert!(out.contains("trained to step 6 (48 samples)"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(manifest["step"], 6);
    // Resuming continues the step count and the sample count.
    let out = train("--steps 9 --resume");
    assert!(out.contains("trained to step 9 (72 samples)"), "{out}");
    let files: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f.starts_with("model-0000009")),
        "{files:?}"
    );
    assert!(
        !files.iter().any(|f| f.starts_with("model-0000006")),
        "old files left: {files:?}"
    );

    let grid = dir.path().join("grid.png");
    let generate = |out_dir: &Path, grid: Option<&Path>| {
        let mut args = vec!["--checkpoint", s(&ckpt), "--out-dir", s(out_dir)];
        if let Some(grid) = grid {
            args.extend(["--out", s(grid)]);
        }
        args.extend([
            "a large red circle in the center",
            "a small blue square at the top left",
        ]);
        run("generate --seed 3", &args);
    };
    let each = dir.path().join("each");
    generate(&each, Some(&grid));
    let first = image::open(each.join("000.png")).unwrap().to_rgb8();
    assert_eq!(first.dimensions(), (32, 32));
    assert!(each.join("001.png").is_file() && !each.join("002.png").exists());
    assert!(image::open(&grid).unwrap().width() > 64);
    // The same seed draws the same image.
    let again = dir.path().join("again");
    generate(&again, None);
    assert_eq!(image::open(again.join("000.png")).unwrap().to_rgb8(), first);

    let out = run("eval --prompts 6", &["--checkpoint", s(&ckpt)]);
    let last = out.lines().last().unwrap();
    let accuracy: f64 = last.strip_prefix("accuracy: ").unwrap().parse().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{out}");
}

#[test]
fn model_info_counts_the_reference_model_near_126m_and_1_1b() {
    let out = ok(&["model-info", "--config", "dalle-1.1b"]);
    let count = |key: &str| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} missing:\n{out}"))
            .trim()
            .parse()
            .unwrap()
    };
    let unique = count("unique_params:");
    let effective = count("effective_params:");
    assert!((unique / 126e6 - 1.0).abs() < 0.03, "{unique}");
    assert!((effective / 1.1e9 - 1.0).abs() < 0.05, "{effective}");
}

#[test]
fn training_without_solo_or_with_a_bad_preset_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = potluck(&["train", "--data", s(dir.path()), "--out", s(dir.path())]);
    assert!(
        text(&out.stderr).contains("--solo"),
        "{}",
        text(&out.stderr)
    );
    let out = potluck(&[
        "train",
        "--solo",
        "--data",
        s(dir.path()),
        "--out",
        s(dir.path()),
    ]);
    assert!(
        text(&out.stderr).contains("potluck prepare"),
        "{}",
        text(&out.stderr)
    );
}
