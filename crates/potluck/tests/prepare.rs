use std::path::Path;

use potluck_data::tokens::TokenSet;

use crate::cli::ok;

/// Settings small enough for a test: seconds, not minutes.
const TINY: &[&str] = &[
    "--vq-steps",
    "30",
    "--vq-batch",
    "8",
    "--held-out",
    "16",
    "--vq-images",
    "64",
    "--vq-channels",
    "8",
    "--codebook",
    "64",
    "--reconstruct",
    "4",
];

fn prepare(dataset: &str, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "prepare",
        "--dataset",
        dataset,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    ok(&args)
}

#[test]
fn shapes_become_token_shards_that_check_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shapes");
    let stdout = prepare(
        "shapes",
        &out,
        &["--images", "300", "--shard-samples", "128"],
    );
    for figure in [
        "PSNR",
        "codebook usage",
        "images/s",
        "300 samples in 3 files",
    ] {
        assert!(stdout.contains(figure), "{figure} missing:\n{stdout}");
    }
    let set = TokenSet::open(&out).unwrap();
    let m = &set.manifest;
    assert_eq!(m.samples, 300);
    assert_eq!(m.image_grid, [8, 8]);
    assert_eq!(m.codebook_size, 64);
    assert!(m.quality.as_ref().unwrap().psnr_db > 5.0);
    let shards = set.load_all().unwrap();
    assert_eq!(shards.iter().map(|s| s.len()).sum::<usize>(), 300);
    // The text ids decode back to grammar captions.
    let tok =
        potluck_model::text::TextTokenizer::load(&out.join(&m.tokenizer), m.text_len).unwrap();
    let caption = tok.decode(&shards[0].row(0).text).unwrap();
    caption.parse::<potluck_data::shapes::Caption>().unwrap();
    let grid = image::open(out.join("reconstruction.png")).unwrap();
    assert!(grid.width() > 4 * 32 && grid.height() > 2 * 32);
    // The image tokenizer loads back from the directory.
    potluck_model::vqvae::VqVae::load(&out.join(&m.vqvae), potluck_model::tch::Device::Cpu)
        .unwrap();
}

#[test]
fn a_folder_with_a_broken_image_is_prepared_and_the_skip_reported() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let shapes = potluck_data::shapes::Shapes::new(40);
    for i in 0..120 {
        let (caption, image) = shapes.sample(9, i);
        image.save(images.join(format!("{i:04}.png"))).unwrap();
        std::fs::write(images.join(format!("{i:04}.txt")), caption.to_string()).unwrap();
    }
    std::fs::write(images.join("0007.png"), b"\x89PNG\r\n\x1a\n broken").unwrap();
    let out = dir.path().join("prepared");
    let spec = format!("webdataset:{}", images.display());
    let stdout = prepare(&spec, &out, &["--shard-samples", "1000"]);
    assert!(
        stdout.contains("skipped input: 1 corrupt images"),
        "{stdout}"
    );
    let set = TokenSet::open(&out).unwrap();
    assert_eq!(set.manifest.samples, 119);
}
