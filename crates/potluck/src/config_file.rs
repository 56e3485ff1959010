//! `potluck train --config-file FILE`: a TOML file holds any of `train`'s flags (`key = value`,
//! the flag's name without `--`; `true` for a switch, an array for a repeated flag). Its flags
//! go in before the command line's, so a flag given on the command line wins (a repeated one,
//! like `--initial-peers`, adds to the file's).
//!
//! ```toml
//! run-id = "shapes1"
//! initial-peers = ["/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW…"]
//! data = "data/shapes"
//! config = "small"
//! out = "runs/peer1"
//! delayed-updates = true
//! ```

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// A config file is read whole: at most this many bytes.
const MAX_FILE: u64 = 1 << 20;

/// `argv` with the flags of the `--config-file` of a `train` command (`potluck train …`) put
/// in right after `train`; other commands' arguments unchanged.
pub(crate) fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let at = 1;
    if argv.get(at).is_none_or(|a| a != "train") {
        return Ok(argv);
    }
    let mut file = None;
    for (i, a) in argv.iter().enumerate().skip(at + 1) {
        let a = a.to_string_lossy();
        if let Some(path) = a.strip_prefix("--config-file=") {
            file = Some(path.to_owned());
        } else if a == "--config-file" {
            let path = argv.get(i + 1).context("--config-file needs a file")?;
            file = Some(path.to_string_lossy().into_owned());
        }
    }
    let Some(file) = file else {
        return Ok(argv);
    };
    let flags = flags(Path::new(&file))?;
    let mut out = argv[..=at].to_vec();
    out.extend(flags);
    out.extend(argv[at + 1..].iter().cloned());
    Ok(out)
}

/// The flags a config file holds (in key order: each flag is given once, so order does not
/// matter).
fn flags(path: &Path) -> Result<Vec<OsString>> {
    let text =
        potluck_core::file::read_text_limited(path, MAX_FILE).context("reading the config file")?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut out = Vec::new();
    for (key, value) in table {
        if key == "config-file" {
            bail!("{}: a config file cannot name another", path.display());
        }
        let flag = OsString::from(format!("--{key}"));
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!(
                    "{}: `{key}` is {}; give a string, a number, true/false or an array",
                    path.display(),
                    other.type_str()
                ),
            })
        };
        match &value {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    out.push(flag.clone());
                    out.push(scalar(item)?.into());
                }
            }
            v => {
                out.push(flag);
                out.push(scalar(v)?.into());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &str) -> Vec<OsString> {
        words.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn a_config_files_flags_go_in_before_the_command_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.toml");
        std::fs::write(
            &path,
            "run-id = \"r1\"\nsteps = 5\nlr = 0.5\nsolo = true\ndelayed-updates = false\n\
             initial-peers = [\"/a\", \"/b\"]\n",
        )
        .unwrap();
        let argv = args(&format!(
            "potluck train --config-file {} --steps 9",
            path.display()
        ));
        let got = expand(argv).unwrap();
        let want = args(&format!(
            "potluck train --initial-peers /a --initial-peers /b --lr 0.5 --run-id r1 --solo \
             --steps 5 --config-file {} --steps 9",
            path.display()
        ));
        assert_eq!(got, want);
        // Other commands, and train without a file, are left alone.
        assert_eq!(
            expand(args("potluck eval --x")).unwrap(),
            args("potluck eval --x")
        );
        assert_eq!(
            expand(args("potluck train --solo")).unwrap(),
            args("potluck train --solo")
        );
    }

    #[test]
    fn a_bad_config_file_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        let err = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let argv = args(&format!("potluck train --config-file {}", path.display()));
            format!("{:#}", expand(argv).unwrap_err())
        };
        assert!(err("steps = ").contains("not valid TOML"));
        assert!(err("[net]\nlisten = 1\n").contains("`net` is table"));
        assert!(err("config-file = \"x\"").contains("cannot name another"));
        let missing = args("potluck train --config-file /nonexistent/train.toml");
        assert!(format!("{:#}", expand(missing).unwrap_err()).contains("reading the config file"));
    }
}
