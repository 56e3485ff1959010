use std::io::Write;
use std::path::Path;

use potluck_data::emoji::{Emoji, PACKAGES, tarball};
use potluck_data::{Order, SkipReason, Skips};

use crate::util::{png, tar, transparent_png, write};

/// A package laid out like the npm one, with `records` as its emoji.json.
fn package(dir: &Path, package: &str, vendor: &str, records: &str, images: &[(&str, Vec<u8>)]) {
    let mut entries: Vec<(String, Vec<u8>)> =
        vec![("package/emoji.json".into(), records.as_bytes().to_vec())];
    for (name, bytes) in images {
        entries.push((format!("package/img/{vendor}/64/{name}"), bytes.clone()));
    }
    let refs: Vec<(&str, &[u8])> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar(&refs)).unwrap();
    write(&tarball(dir, package), &gz.finish().unwrap());
}

const RECORDS: &str = r#"[
  {"name": "GRINNING FACE", "image": "1f600.png", "has_img_google": true, "has_img_twitter": true},
  {"name": "FATHER CHRISTMAS", "image": "1f385.png", "has_img_google": true, "has_img_twitter": false,
   "skin_variations": {"1F3FB": {"image": "1f385-1f3fb.png", "has_img_google": true, "has_img_twitter": true}}},
  {"name": null, "image": "nameless.png", "has_img_google": true},
  {"name": "GHOST", "image": "1f47b.png", "has_img_google": true, "has_img_twitter": true}
]"#;

#[test]
fn packages_give_captioned_images_composited_over_white() {
    let dir = tempfile::tempdir().unwrap();
    let red = png([255, 0, 0]);
    package(
        dir.path(),
        PACKAGES[0],
        "google",
        RECORDS,
        &[
            ("1f600.png", red.clone()),
            ("1f385.png", red.clone()),
            ("1f385-1f3fb.png", transparent_png()),
            ("nameless.png", red.clone()),
        ],
    );
    package(
        dir.path(),
        PACKAGES[1],
        "twitter",
        RECORDS,
        &[
            ("1f600.png", red.clone()),
            ("1f385-1f3fb.png", b"broken".to_vec()),
            ("1f47b.png", red),
        ],
    );
    let skips = Skips::default();
    let emoji = Emoji::open(dir.path(), &skips).unwrap();
    // google: grinning, santa, santa light (ghost's image missing); twitter: grinning, santa
    // light, ghost. The nameless record is skipped in both.
    assert_eq!(emoji.len(), 6);
    assert_eq!(skips.count(SkipReason::MissingCaption), 3);
    let samples: Vec<_> = emoji.stream(&Order::new(0, 0), &skips).collect();
    assert_eq!(samples.len(), 5, "the broken twitter png is skipped");
    assert_eq!(skips.count(SkipReason::CorruptImage), 1);
    let light = samples
        .iter()
        .find(|s| s.caption == "father christmas, light skin tone")
        .expect("skin tone caption");
    assert_eq!(light.image.get_pixel(0, 0).0, [255, 255, 255]);
    assert!(samples.iter().any(|s| s.caption == "grinning face"));
}
