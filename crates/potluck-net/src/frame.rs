//! Length-prefixed frames on byte streams: a `u32` little-endian length, then the bytes. The
//! reader checks the length against its limit before it allocates or reads anything.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes the concatenation of `parts` as one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    w.write_all(&len.to_le_bytes()).await?;
    for p in parts {
        w.write_all(p).await?;
    }
    w.flush().await
}

/// Reads one frame of at most `limit` bytes into `buf` (the length checked before reading).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes over the limit of {limit}"),
        ));
    }
    buf.resize(len, 0);
    r.read_exact(buf).await
}

/// Writes `msg` (postcard) as one frame.
pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    let bytes = postcard::to_allocvec(msg)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    write_frame(w, &[&bytes]).await
}

/// Reads one frame of at most `limit` bytes and decodes it (postcard).
pub async fn read_message<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
    limit: usize,
) -> std::io::Result<T> {
    let mut buf = Vec::new();
    read_frame(r, limit, &mut buf).await?;
    postcard::from_bytes(&buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused_before_reading() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &[b"ab", b"cde"]).await.unwrap();
        write_message(&mut wire, &(7u32, "x".to_string()))
            .await
            .unwrap();
        let mut r = futures::io::Cursor::new(wire.clone());
        let mut buf = Vec::new();
        read_frame(&mut r, 5, &mut buf).await.unwrap();
        assert_eq!(buf, b"abcde");
        let m: (u32, String) = read_message(&mut r, 64).await.unwrap();
        assert_eq!(m, (7, "x".into()));
        // A length over the limit is refused without reading on.
        let mut r = futures::io::Cursor::new(wire);
        let err = read_frame(&mut r, 4, &mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        // A length announcing more than is there: an error, not a hang.
        let mut r = futures::io::Cursor::new(vec![200, 0, 0, 0, 1, 2]);
        assert!(read_frame(&mut r, 1000, &mut buf).await.is_err());
    }
}
