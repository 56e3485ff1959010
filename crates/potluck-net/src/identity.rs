//! A peer's identity: an ed25519 keypair kept in a file, so a peer keeps its id across restarts.
//!
//! The file holds libp2p's protobuf encoding of the keypair (the same bytes other libp2p
//! implementations read) and is created with mode 0600.

use std::io::Write;
use std::path::Path;

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use potluck_core::file;

/// Largest identity file we read.
const MAX_FILE_BYTES: u64 = 4096;

/// Errors reading or writing an identity.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] file::Error),
    #[error("{path}: not an identity file ({reason}); make one with `potluck keygen --out FILE`")]
    Invalid {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("{0} exists already: pass another path or delete it first")]
    Exists(std::path::PathBuf),
}

/// A fresh ed25519 identity.
pub fn generate() -> Keypair {
    Keypair::generate_ed25519()
}

/// Reads an identity file.
pub fn load(path: &Path) -> Result<Keypair, Error> {
    let bytes = file::read_limited(path, MAX_FILE_BYTES).map_err(|e| match e {
        file::Error::TooLarge { len, .. } => Error::Invalid {
            path: path.to_path_buf(),
            reason: format!("{len} bytes"),
        },
        e => Error::File(e),
    })?;
    let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if key.key_type() != libp2p::identity::KeyType::Ed25519 {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            reason: "not an ed25519 key".into(),
        });
    }
    Ok(key)
}

/// Writes a new identity file (refusing to overwrite one), readable by its owner only.
pub fn save(key: &Keypair, path: &Path) -> Result<(), Error> {
    if path.exists() {
        return Err(Error::Exists(path.to_path_buf()));
    }
    let io = |source| Error::File(file::Error::io(path, source));
    let bytes = key.to_protobuf_encoding().map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}

/// Loads `path` if it exists, else makes a new identity there.
pub fn load_or_create(path: &Path) -> Result<Keypair, Error> {
    if path.exists() {
        load(path)
    } else {
        let key = generate();
        save(&key, path)?;
        Ok(key)
    }
}

/// The public key inside a peer id (ed25519 ids embed it), if there is one.
pub fn public_key(peer: &PeerId) -> Option<PublicKey> {
    let hash = peer.as_ref();
    // Code 0 is the identity multihash: the digest is the protobuf-encoded public key.
    if hash.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(hash.digest()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_survives_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let key = load_or_create(&path).unwrap();
        let again = load_or_create(&path).unwrap();
        assert_eq!(key.public().to_peer_id(), again.public().to_peer_id());
        assert!(matches!(save(&key, &path), Err(Error::Exists(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn garbage_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        std::fs::write(&path, b"not a key").unwrap();
        assert!(matches!(load(&path), Err(Error::Invalid { .. })));
        std::fs::write(&path, vec![0u8; 10_000]).unwrap();
        assert!(matches!(load(&path), Err(Error::Invalid { .. })));
    }

    #[test]
    fn the_public_key_comes_back_out_of_the_peer_id() {
        let key = generate();
        let peer = key.public().to_peer_id();
        assert_eq!(public_key(&peer), Some(key.public()));
        let sig = key.sign(b"hello").unwrap();
        assert!(public_key(&peer).unwrap().verify(b"hello", &sig));
    }
}
