//! End-to-end tests of training: on one machine, in swarms (joining, a slow peer; peers that
//! come and go are in `churn`), with an aux peer, and in an authorized run.

use std::path::Path;

use crate::cli::{ok, potluck, text};
use crate::harness::{Peer, peer_args, run, s, strs, tiny_data, wait_for_metrics};

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
    // Every flag can come from a TOML file; the command line wins over it.
    let toml = dir.path().join("train.toml");
    let text = format!(
        "solo = true\nconfig = \"tiny\"\nbatch-size = 8\nsteps = 10\nresume = true\n\
         data = {:?}\nout = {:?}\n",
        s(&data),
        s(&ckpt)
    );
    std::fs::write(&toml, text).unwrap();
    let out = run("train --config-file", &[s(&toml), "--steps", "11"]);
    assert!(out.contains("trained to step 11 (88 samples)"), "{out}");

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

#[test]
fn two_peers_train_one_model_and_the_second_downloads_the_state_to_join() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let (first, second) = pair(
        dir.path(),
        &data,
        "pair",
        20,
        &["--measure-links-every", "2"],
    );
    // Each measured its uplink by probing the other (loopback: fast), and says what it moved.
    for out in [&first, &second] {
        assert!(figure(out, "link: ", "MB/s") > 0.0, "{out}");
        assert!(figure(out, "traffic: ", "MB,") > 0.0, "{out}");
    }
    // The gradients go compressed (`--codec auto`, the default; every tensor of `tiny` is
    // under 65,536 values, so in fp16 here): a newcomer, which serves no state, sends about
    // half the bytes per sample it sends in f32 (`--codec none`; 0.50, 0.54 and 0.69 in three
    // runs, the messages around the values included: how many epochs a sample shares follows
    // the two peers' timing).
    let coded = sent_per_sample(dir.path(), &data, "coded", &[]);
    let exact = sent_per_sample(dir.path(), &data, "plain", &["--codec", "none"]);
    println!("bytes sent per sample: {coded:.0} with --codec auto, {exact:.0} with none");
    assert!(
        coded > 0.0 && coded < 0.8 * exact,
        "bytes sent per sample: {coded} with --codec auto, {exact} with none"
    );
}

/// Local-update mode through `train --local-steps`: two peers hold one outer state (the same
/// loss on the fixed samples, the same round in their checkpoints), and a newcomer sends a
/// fraction of the bytes per sample that averaging every step with the same codec sends.
#[test]
fn two_peers_in_local_update_mode_train_one_model_and_send_a_fraction_per_sample() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let (first, _) = pair(dir.path(), &data, "local", 5, &["--local-steps", "4"]);
    assert!(
        first.contains("local updates: an epoch is a round of 128 samples"),
        "{first}"
    );
    let every = sent_per_sample(dir.path(), &data, "every", &[]);
    // Rounds of 8 batches: an eighth of the averagings, but every-step epochs overshoot
    // their 32 samples (micro-batches of 16 under way as the target is met) where a round of
    // 256 hardly does, and a round's messages around the values weigh the same.
    let local = sent_per_sample(dir.path(), &data, "rounds", &["--local-steps", "8"]);
    println!("bytes sent per sample: {local:.0} in rounds of 8 batches, {every:.0} every step");
    assert!(
        local > 0.0 && local < 0.4 * every,
        "bytes sent per sample: {local} in rounds of 8 batches, {every} every step"
    );
}

/// The bytes per sample a newcomer to a peer of run `run` sends in its 12 s of training
/// together (`extra`: both peers' flags), without the state averaging every 10 epochs (exact,
/// it would weigh as much as several epochs of compressed gradients) and without probes of the
/// link (on loopback each is megabytes). The first peer trains
/// on until the newcomer is done, however late it joined.
fn sent_per_sample(dir: &Path, data: &Path, run: &str, extra: &[&str]) -> f64 {
    let (out, new) = (
        dir.join(format!("{run}-first")),
        dir.join(format!("{run}-new")),
    );
    let timed = [
        "--state-every",
        "0",
        "--target-batch-size",
        "32",
        "--measure-links-every",
        "0",
    ];
    let flags = |minutes: &'static str| -> Vec<&str> {
        let mut flags = vec!["--minutes", minutes];
        flags.extend(timed);
        flags.extend(extra);
        flags
    };
    let mut args = peer_args(run, data, &out, &flags("5"));
    args.extend(["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()]);
    let mut first = Peer::spawn(&strs(&args));
    let addr = first.wait_for("listening on ");
    let mut args = peer_args(run, data, &new, &flags("0.2"));
    args.extend(["--initial-peers".into(), addr]);
    let said = ok(&strs(&args));
    first.kill();
    let sent = figure(&said, "traffic: ", "bytes");
    assert!(sent > 0.0, "the newcomer of {run} averaged nothing: {said}");
    sent
}

/// Two peers of run `run` train `tiny` for 12 epochs (the second joins through the first and
/// downloads its state); both hold the same parameters at the end. Their outputs. The first
/// acts as a machine `slower` times slower (`--throttle`): alone, it took 50 ms an epoch, and
/// could end all 12 before the second was up.
fn pair(dir: &Path, data: &Path, run: &str, slower: u32, extra: &[&str]) -> (String, String) {
    let common = |out: &Path| -> Vec<String> {
        [
            "train",
            "--run-id",
            run,
            "--config",
            "tiny",
            "--target-batch-size",
            "32",
            "--micro-batch",
            "8",
            "--epochs",
            "12",
            "--threads",
            "1",
            "--data",
            s(data),
            "--out",
            s(out),
        ]
        .iter()
        .chain(extra)
        .map(|a| (*a).to_owned())
        .collect()
    };
    let (one, two) = (
        dir.join(format!("{run}-one")),
        dir.join(format!("{run}-two")),
    );
    let mut args = common(&one);
    args.extend(["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()]);
    args.extend(["--throttle".into(), slower.to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = Peer::spawn(&args);
    // The first peer prints where it listens before it trains. The second joins once the
    // first has ended an epoch (published its metrics), so it has a state to download: joining
    // sooner, on a loaded machine, it came while the first was still in epoch 0, and the two
    // trained from the same initial state with nothing to download.
    let addr = first.wait_for("listening on ");
    wait_for_metrics(&addr, run, 1);
    let mut args = common(&two);
    args.extend(["--initial-peers".into(), addr]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let second = ok(&args);
    let first = first.finish();
    for out in [&first, &second] {
        assert!(out.contains("trained to epoch 12"), "{out}");
    }
    assert!(
        second.contains("downloaded the swarm's state at epoch"),
        "{second}"
    );
    // Both hold the same parameters: the same loss on the fixed samples, to the last digit.
    let fixed = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("loss on "))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no fixed loss in {out}"))
    };
    assert_eq!(fixed(&first), fixed(&second));
    for ckpt in [&one, &two] {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ckpt.join("checkpoint.json")).unwrap()).unwrap();
        assert_eq!(manifest["step"], 12, "{manifest}");
        assert_eq!(manifest["extra"]["run_id"], run);
    }
    (first, second)
}

/// Data prepared apart (its own tokenizers) is refused by a run, with the command that fixes
/// it; `prepare --from-run` takes the run's tokenizers from its peers (the same bytes), and data
/// encoded with them joins the run.
#[test]
fn data_of_other_tokenizers_is_refused_and_prepare_from_run_takes_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let apart = dir.path().join("apart");
    run(
        "prepare --dataset shapes --images 256 --vq-steps 20 --vq-batch 8 --held-out 8 \
         --vq-images 64 --vq-channels 8 --codebook 64 --seed 1",
        &["--out", s(&apart)],
    );
    let tiny = |data: &Path, out: &str, extra: &[&str]| {
        let mut args = peer_args("tok", data, &dir.path().join(out), extra);
        args.extend(["--target-batch-size".into(), "32".into()]);
        args
    };
    let first = tiny(
        &data,
        "one",
        &["--listen", "/ip4/127.0.0.1/tcp/0", "--epochs", "1000000"],
    );
    let mut first = Peer::spawn(&strs(&first));
    let addr = first.wait_for("listening on ");
    // The run exists (its first peer reports) before anyone joins it.
    first.wait_for("run tok:");

    // Data of its own tokenizers: refused, told how to take the run's.
    let refused = potluck(&strs(&tiny(
        &apart,
        "two",
        &["--initial-peers", &addr, "--epochs", "1000000"],
    )));
    let err = text(&refused.stderr);
    assert!(!refused.status.success(), "{}", text(&refused.stdout));
    assert!(err.contains("other tokenizers"), "{err}");
    assert!(
        err.contains(&format!(
            "potluck prepare --from-run tok --initial-peers {addr}"
        )),
        "{err}"
    );

    // The run's tokenizers, from its peer: the same files.
    let joining = dir.path().join("joining");
    let out = run(
        "prepare --from-run tok --dataset shapes --images 256 --held-out 8",
        &["--initial-peers", &addr, "--out", s(&joining)],
    );
    assert!(
        out.contains("took the tokenizers of run tok from its peers"),
        "{out}"
    );
    for file in ["tokenizer.json", "vqvae.safetensors"] {
        assert_eq!(
            std::fs::read(data.join(file)).unwrap(),
            std::fs::read(joining.join(file)).unwrap(),
            "{file}"
        );
    }
    let joined = ok(&strs(&tiny(
        &joining,
        "three",
        &["--initial-peers", &addr, "--minutes", "0.2"],
    )));
    assert!(
        joined.contains("downloaded the swarm's state at epoch"),
        "{joined}"
    );
    first.kill();
}

/// A peer four times slower (`--throttle 4`: every micro-batch computed four times) gives
/// about a quarter of the other's samples, and the fast peer does not wait for it: epochs end
/// when the swarm has the target, whoever gathered it.
#[test]
fn a_slow_peer_gives_its_share_and_does_not_hold_the_epoch_back() {
    slow_peer("uneven", &["--target-batch-size", "1536", "--epochs", "8"]);
}

/// The same in local-update mode: rounds of 4 × 384 samples, in which the slow peer takes a
/// quarter of the fast one's inner steps, and the round ends when the swarm has its samples.
#[test]
fn a_slow_peer_takes_fewer_inner_steps_and_does_not_hold_the_round_back() {
    slow_peer(
        "uneven-local",
        &[
            "--target-batch-size",
            "384",
            "--local-steps",
            "4",
            "--epochs",
            "8",
        ],
    );
}

/// Two peers of run `run` with flags `common`, one throttled 4×: the slow one's share of the
/// samples, and both peers' time computing, as [`a_slow_peer_gives_its_share_and_does_not_hold_the_epoch_back`] asks.
fn slow_peer(run: &str, common: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let mut fast = peer_args(run, &data, &dir.path().join("fast"), common);
    fast.extend(["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()]);
    let mut fast = Peer::spawn(&strs(&fast));
    let addr = fast.wait_for("listening on ");
    let mut slow = peer_args(run, &data, &dir.path().join("slow"), common);
    slow.extend([
        "--initial-peers".into(),
        addr,
        "--throttle".into(),
        "4".into(),
    ]);
    let slow = Peer::spawn(&strs(&slow)).finish();
    let fast = fast.finish();
    let here = |out: &str| figure(out, "trained to epoch", "here,");
    let share = here(&slow) / here(&fast);
    // The fraction of its time a peer spent computing ("… P% of the time").
    let busy = |out: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with("trained to epoch"))
            .unwrap();
        let pct = line.split(' ').find(|w| w.ends_with('%')).unwrap();
        pct.trim_end_matches('%').parse().unwrap()
    };
    println!(
        "slow/fast samples {share:.2}; computing: fast {}%, slow {}%",
        busy(&fast),
        busy(&slow)
    );
    assert!(
        (0.12..=0.45).contains(&share),
        "share {share}\n{fast}\n{slow}"
    );
    // Held back, the fast peer would idle while the slow one computes: it computes for as
    // large a part of its time as the slow one.
    assert!(busy(&fast) >= 0.8 * busy(&slow), "{fast}\n{slow}");
}

/// The number before `word` in the line starting with `prefix`.
fn figure(out: &str, prefix: &str, word: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {out}"));
    let words: Vec<&str> = line.split(' ').collect();
    let at = words
        .iter()
        .position(|w| w.trim_end_matches(';') == word)
        .unwrap_or_else(|| panic!("no {word:?} in {line}"));
    words[at - 1]
        .trim_start_matches('(')
        .parse()
        .unwrap_or_else(|_| panic!("no number before {word:?} in {line}"))
}

#[test]
fn an_aux_peer_keeps_checkpoints_a_new_swarm_resumes_from() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let common = ["--target-batch-size", "48", "--epochs", "8"];
    // The aux peer is there from the start, as a run's helper is: the bootstrap node.
    let ckpts = dir.path().join("aux");
    let mut aux = Peer::spawn(&[
        "aux",
        "--run-id",
        "aux",
        "--config",
        "tiny",
        "--data",
        s(&data),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--target-batch-size",
        "48",
        "--checkpoint-dir",
        s(&ckpts),
        "--every",
        "3",
        "--keep",
        "2",
        "--epochs",
        "8",
        "--warmup",
        "5",
    ]);
    let addr = aux.wait_for("listening on ");
    let trainer = |name: &str| {
        let mut args = peer_args("aux", &data, &dir.path().join(name), &common);
        args.extend(["--initial-peers".into(), addr.clone()]);
        Peer::spawn(&strs(&args))
    };
    let (a, b) = (trainer("a"), trainer("b"));
    let (a, b) = (a.finish(), b.finish());
    let aux = aux.finish();
    assert!(aux.contains("stopped at epoch 8"), "{aux}");
    // Rolling: epochs 3 and 6 were written, then 8 at the stop; two are kept.
    let mut kept: Vec<String> = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["epoch-0000006", "epoch-0000008"], "{aux}");
    // The aux peer holds the swarm's model: the same loss on the fixed samples.
    let last = ckpts.join("epoch-0000008");
    let fixed = |out: &str| figure(out, "loss on ", "fixed") as u64;
    assert_eq!(fixed(&a), fixed(&b));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(last.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(manifest["step"], 8);
    // The swarm the aux peer started has the run's optimizer (its flags), not a placeholder:
    // the trainers learnt.
    assert_eq!(
        manifest["extra"]["optimizer"]["schedule"]["peak"], 0.01,
        "{manifest}"
    );
    for out in [&a, &b] {
        let line = out
            .lines()
            .find(|l| l.starts_with("training loss "))
            .unwrap_or_else(|| panic!("{out}"));
        let losses: Vec<f64> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
        assert!(losses[1] < losses[0], "{line}");
    }
    // The checkpoint is complete: it draws.
    let drawn = dir.path().join("drawn");
    ok(&[
        "generate",
        "--checkpoint",
        s(&last),
        "--out-dir",
        s(&drawn),
        "a small red circle in the center",
    ]);
    assert!(drawn.join("000.png").exists());
    // A new swarm (everyone gone) starts from it at epoch 8.
    let resumed = ok(&strs(&peer_args(
        "aux",
        &data,
        &dir.path().join("c"),
        &[
            "--target-batch-size",
            "48",
            "--epochs",
            "10",
            "--init",
            s(&last),
        ],
    )));
    assert!(resumed.contains("at epoch 8"), "{resumed}");
    assert!(resumed.contains("trained to epoch 10"), "{resumed}");
}

#[test]
fn an_authorized_run_admits_its_token_holders_and_refuses_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let path = |name: &str| dir.path().join(name);
    // An authority (its public key); a peer `name` with an identity and a token from it.
    let new_authority = |key: &str| -> String {
        let init = run("authority init --run-id guarded --out", &[s(&path(key))]);
        let line = init.lines().find_map(|l| l.strip_prefix("authority: "));
        line.unwrap().to_owned()
    };
    // Returns its peer id.
    let enrol = |name: &str, role: &str, by: &str| -> String {
        let id = run("keygen --out", &[s(&path(&format!("{name}.key")))]);
        let peer = id
            .lines()
            .find_map(|l| l.strip_prefix("peer id: "))
            .unwrap();
        let token = path(&format!("{name}.token"));
        let (key, token) = (path(by), s(&token).to_owned());
        let args = [
            "--key",
            s(&key),
            "--peer",
            peer,
            "--role",
            role,
            "--out",
            &token,
        ];
        run("authority grant --run-id guarded --ttl 1h", &args);
        peer.to_owned()
    };
    let authority = new_authority("authority.key");
    // A bootstrap node and two trainers.
    let mut ids = std::collections::HashMap::new();
    for (name, role) in [("boot", "aux"), ("one", "trainer"), ("two", "trainer")] {
        ids.insert(name, enrol(name, role, "authority.key"));
    }
    // The flags of a peer of an authorized run: its authority, identity and token.
    let credentials = |authority: &str, key: &str, token: &str| -> Vec<String> {
        let (key, token) = (path(key), path(token));
        let flags = [
            "--authority",
            authority,
            "--identity",
            s(&key),
            "--token",
            s(&token),
        ];
        flags.iter().map(|a| (*a).to_owned()).collect()
    };
    let member = |name: &str| -> Vec<String> {
        let mut args = vec!["--run-id".to_owned(), "guarded".to_owned()];
        let (key, token) = (format!("{name}.key"), format!("{name}.token"));
        args.extend(credentials(&authority, &key, &token));
        args
    };
    let mut args: Vec<String> = ["dht", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    args.extend(member("boot"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut boot = Peer::spawn(&args);
    let addr = format!("/ip4/127.0.0.1{}", boot.wait_for("/ip4/127.0.0.1"));
    let trainer = |name: &str| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--config",
            "tiny",
            "--target-batch-size",
            "32",
            "--micro-batch",
            "8",
            "--epochs",
            "6",
            "--threads",
            "1",
            "--data",
            s(&data),
            "--initial-peers",
            &addr,
            "--out",
            s(&path(&format!("{name}.ckpt"))),
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        args.extend(member(name));
        args
    };
    let args = trainer("one");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let one = Peer::spawn(&args);
    let args = trainer("two");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let two = ok(&args);
    let one = one.finish();
    for out in [&one, &two] {
        assert!(out.contains("trained to epoch 6"), "{out}");
    }

    // The authority charters the run's tokenizers and optimizer settings: a member whose data
    // was encoded with other tokenizers is refused, though no peer is around to compare with,
    // and told how to take the run's.
    let key = path("authority.key");
    let said = run(
        "authority charter --run-id guarded --lr 0.004 --decay-steps 500",
        &[
            "--key",
            s(&key),
            "--data",
            s(&data),
            "--initial-peers",
            &addr,
        ],
    );
    assert!(said.contains("run guarded: chartered tokenizers"), "{said}");
    assert!(said.contains("learning rate 0.004"), "{said}");
    // A member asking for another learning rate steps with the charter's: its flags are its
    // word, the charter the run's.
    enrol("four", "trainer", "authority.key");
    let mut args = trainer("four");
    let at = args.iter().position(|a| a == "6").unwrap();
    args[at] = "2".to_owned();
    args.extend(["--lr".to_owned(), "0.02".to_owned()]);
    let out = ok(&strs(&args));
    assert!(
        out.contains("the run's charter fixes its optimizer"),
        "{out}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path("four.ckpt").join("checkpoint.json")).unwrap())
            .unwrap();
    let schedule = &manifest["extra"]["optimizer"]["schedule"];
    assert_eq!(schedule["peak"], 0.004, "{manifest}");
    assert_eq!(schedule["total"], 500, "{manifest}");
    let apart = path("apart");
    run(
        "prepare --dataset shapes --images 64 --vq-steps 5 --vq-batch 8 --held-out 8 \
         --vq-images 16 --vq-channels 8 --codebook 64 --seed 1",
        &["--out", s(&apart)],
    );
    enrol("three", "trainer", "authority.key");
    let mut args = trainer("three");
    let at = args.iter().position(|a| a == s(&data)).unwrap();
    args[at] = s(&apart).to_owned();
    let out = potluck(&strs(&args));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "data of other tokenizers trained");
    assert!(
        err.contains("the run's authority chartered other tokenizers"),
        "{err}"
    );
    assert!(err.contains("potluck prepare --from-run guarded"), "{err}");

    // Without a token: the bootstrap refuses to answer, and the peer says why.
    let intruder_out = path("intruder.ckpt");
    let intruder = |extra: &[&str]| {
        let mut args: Vec<&str> = [
            "train",
            "--run-id",
            "guarded",
            "--config",
            "tiny",
            "--epochs",
            "2",
            "--threads",
            "1",
            "--data",
            s(&data),
            "--initial-peers",
            &addr,
            "--out",
            s(&intruder_out),
        ]
        .to_vec();
        args.extend_from_slice(extra);
        let out = potluck(&args);
        assert!(!out.status.success(), "an intruder trained");
        text(&out.stderr)
    };
    let err = intruder(&[]);
    assert!(err.contains("not admitted to this run"), "{err}");
    // With its own authority's token: the node refuses the token.
    let own = new_authority("own.key");
    let intruder_id = enrol("intruder", "trainer", "own.key");
    let flags = credentials(&own, "intruder.key", "intruder.token");
    let err = intruder(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("not signed by this run's authority"), "{err}");
    // A member's token with another identity is refused before anything starts.
    let flags = credentials(&authority, "intruder.key", "one.token");
    let err = intruder(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("pass --identity"), "{err}");

    // The authority revokes trainer two through the bootstrap; a node that joins after reads
    // the list first and refuses it, though its token is valid.
    let revoke = |peer: &str| {
        let args = ["--key", s(&key), "--peer", peer, "--initial-peers", &addr];
        run("authority revoke --run-id guarded", &args)
    };
    let said = revoke(&ids["two"]);
    assert!(
        said.contains("revoked 1 peers in run guarded (1 new)"),
        "{said}"
    );
    // Revoking another keeps the published list: it was read back from the DHT.
    let said = revoke(&intruder_id);
    assert!(
        said.contains("revoked 2 peers in run guarded (1 new)"),
        "{said}"
    );
    enrol("late", "aux", "authority.key");
    let mut args: Vec<String> = ["dht", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]
        .iter()
        .map(|a| (*a).to_owned())
        .chain(["--initial-peers".to_owned(), addr.clone()])
        .collect();
    args.extend(member("late"));
    let mut late = Peer::spawn(&strs(&args));
    let late_addr = format!("/ip4/127.0.0.1{}", late.wait_for("/ip4/127.0.0.1"));
    let mut args = trainer("two");
    let at = args.iter().position(|a| a == &addr).unwrap();
    args[at] = late_addr;
    let out = potluck(&strs(&args));
    assert!(!out.status.success(), "a revoked peer trained");
    let err = text(&out.stderr);
    assert!(err.contains("revoked by the run's authority"), "{err}");
    late.kill();
    boot.kill();
}
