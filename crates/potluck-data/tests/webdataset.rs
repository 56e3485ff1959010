use std::collections::BTreeSet;

use potluck_data::webdataset::WebDataset;
use potluck_data::{Order, SkipReason, Skips};

use crate::util::{jpeg, png, tar, write};

fn captions(web: &WebDataset, order: Order, skips: &Skips) -> Vec<String> {
    web.stream(&order, skips).map(|s| s.caption).collect()
}

#[test]
fn shards_yield_pairs_and_skip_broken_png_and_missing_caption() {
    let dir = tempfile::tempdir().unwrap();
    let red = png([255, 0, 0]);
    let blue = jpeg([0, 0, 255]);
    let mut broken = png([0, 255, 0]);
    broken.truncate(broken.len() / 2);
    write(
        &dir.path().join("a.tar"),
        &tar(&[
            ("000.png", &red),
            ("000.txt", b"a red thing\n"),
            ("001.jpg", &blue),
            ("001.txt", b"a blue thing"),
            ("002.png", &broken),
            ("002.txt", b"a broken thing"),
            ("003.png", &red),
            ("004.txt", b"a caption without image"),
            ("005.json", b"{}"),
            ("005.png", &red),
            ("005.txt", b"with extra json"),
        ]),
    );
    let skips = Skips::default();
    let web = WebDataset::open(dir.path(), &skips).unwrap();
    let got: BTreeSet<String> = captions(&web, Order::new(0, 0), &skips)
        .into_iter()
        .collect();
    let want: BTreeSet<String> = ["a red thing", "a blue thing", "with extra json"]
        .map(String::from)
        .into();
    assert_eq!(got, want);
    assert_eq!(skips.count(SkipReason::CorruptImage), 1);
    assert_eq!(skips.count(SkipReason::MissingCaption), 2);
}

#[test]
fn a_truncated_tar_ends_its_shard_not_the_pass() {
    let dir = tempfile::tempdir().unwrap();
    let red = png([255, 0, 0]);
    let good = tar(&[("x/000.png", &red), ("x/000.txt", b"intact")]);
    write(&dir.path().join("good.tar"), &good);
    let mut cut = tar(&[
        ("y/000.png", &red),
        ("y/000.txt", b"before the cut"),
        ("y/001.png", &red),
        ("y/001.txt", b"after the cut"),
    ]);
    // Cut inside the third entry's data.
    cut.truncate(512 * 5 + 10);
    write(&dir.path().join("cut.tar"), &cut);
    let skips = Skips::default();
    let web = WebDataset::open(dir.path(), &skips).unwrap();
    let got: BTreeSet<String> = captions(&web, Order::new(0, 0), &skips)
        .into_iter()
        .collect();
    assert!(got.contains("intact"), "{got:?}");
    assert!(got.contains("before the cut"), "{got:?}");
    assert!(!got.contains("after the cut"), "{got:?}");
    assert_eq!(skips.count(SkipReason::TruncatedArchive), 1, "{skips}");
}

#[test]
fn garbage_and_empty_tars_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.tar"), &[0x5a; 1000]);
    write(&dir.path().join("b.tar"), &[]);
    let red = png([255, 0, 0]);
    write(
        &dir.path().join("c.tar"),
        &tar(&[("k.png", &red), ("k.txt", b"fine")]),
    );
    let skips = Skips::default();
    let web = WebDataset::open(dir.path(), &skips).unwrap();
    assert_eq!(captions(&web, Order::new(0, 0), &skips), ["fine"]);
    assert!(skips.total() >= 1, "{skips}");
}

#[test]
fn folders_pair_images_with_sidecars_in_a_per_peer_order() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..40 {
        let sub = if i % 2 == 0 { "even" } else { "odd" };
        write(
            &dir.path().join(format!("{sub}/{i:03}.png")),
            &png([i as u8, 0, 0]),
        );
        if i != 7 {
            write(
                &dir.path().join(format!("{sub}/{i:03}.txt")),
                format!("image {i}").as_bytes(),
            );
        }
    }
    write(&dir.path().join("odd/009.png"), b"not a png at all");
    let skips = Skips::default();
    let web = WebDataset::open(dir.path(), &skips).unwrap();
    assert_eq!(skips.count(SkipReason::MissingCaption), 1);
    let a = captions(&web, Order::new(1, 0), &skips);
    assert_eq!(skips.count(SkipReason::CorruptImage), 1);
    assert_eq!(a.len(), 38);
    let b = captions(&web, Order::new(1, 1), &skips);
    assert_ne!(a, b, "two peers read the same order");
    assert_eq!(
        a.iter().collect::<BTreeSet<_>>(),
        b.iter().collect::<BTreeSet<_>>()
    );
    assert_eq!(
        a,
        captions(&web, Order::new(1, 0), &skips),
        "not deterministic"
    );
}

#[test]
fn a_missing_path_is_a_clear_error() {
    let err = WebDataset::open("/nonexistent/shards".as_ref(), &Skips::default()).unwrap_err();
    assert!(err.to_string().contains("no such file"), "{err}");
}
