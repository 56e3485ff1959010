use std::process::{Command, Output};

pub(crate) fn potluck(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running potluck")
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs potluck, expecting success; returns its standard output.
pub(crate) fn ok(args: &[&str]) -> String {
    let out = potluck(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "potluck {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[test]
fn help_lists_every_command_in_one_line() {
    let out = potluck(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for command in [
        "demo",
        "prepare",
        "train",
        "generate",
        "eval",
        "model-info",
        "bench",
        "aux",
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(command))
            .unwrap_or_else(|| panic!("{command} missing from:\n{help}"));
        assert!(line.len() > command.len() + 10, "no description: {line}");
    }
}

#[test]
fn every_command_help_has_an_example() {
    for command in [
        "demo",
        "prepare",
        "train",
        "aux",
        "generate",
        "eval",
        "model-info",
    ] {
        let out = potluck(&[command, "--help"]);
        assert!(out.status.success());
        assert!(text(&out.stdout).contains("Example: potluck"), "{command}");
    }
}

#[test]
fn keygen_writes_an_identity_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id.key");
    let out = ok(&["keygen", "--out", path.to_str().unwrap()]);
    assert!(out.contains("peer id: 12D3KooW"), "{out}");
    let again = potluck(&["keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("exists"));
}

#[test]
fn a_bad_data_set_name_says_what_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = potluck(&[
        "prepare",
        "--dataset",
        "squares",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("webdataset:PATH"), "{err}");
}

/// Why this machine can't run a test that needs root and these tools, if it can't.
pub(crate) fn missing_root_or(tools: &[&str]) -> Option<String> {
    use std::process::{Command, Stdio};
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("not root".into());
    }
    tools
        .iter()
        .find(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|tool| format!("no `{tool}`"))
}
