//! Files read with a bound and written so that a crash never leaves a broken one behind; the one
//! error type for a file that could not be read or written, which every crate's errors wrap.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A file that could not be read or written, with its path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused (missing, no permission, disk full, not UTF-8 text).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than its reader accepts (checked before reading).
    #[error("{path}: {len} bytes is more than the limit of {limit}")]
    TooLarge { path: PathBuf, len: u64, limit: u64 },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether the file was not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Writes `bytes` to `path` atomically: into a temporary file beside it, fsynced, then renamed
/// over `path`, and the directory fsynced. A reader sees the old file or the new one, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Reads a whole file after checking that it is at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, Error> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > limit {
        return Err(Error::TooLarge {
            path: path.into(),
            len,
            limit,
        });
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a whole UTF-8 text file after checking that it is at most `limit` bytes.
pub fn read_text_limited(path: &Path, limit: u64) -> Result<String, Error> {
    String::from_utf8(read_limited(path, limit)?).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn read_limited_refuses_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        std::fs::write(&path, [0u8; 100]).unwrap();
        assert!(matches!(
            read_limited(&path, 99),
            Err(Error::TooLarge { len: 100, .. })
        ));
        assert_eq!(read_limited(&path, 100).unwrap().len(), 100);
    }

    #[test]
    fn text_must_be_utf8_and_a_missing_file_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.txt");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(read_text_limited(&path, 10).is_err());
        std::fs::write(&path, "hé").unwrap();
        assert_eq!(read_text_limited(&path, 10).unwrap(), "hé");
        assert!(
            read_limited(&dir.path().join("gone"), 10)
                .unwrap_err()
                .is_not_found()
        );
    }
}
