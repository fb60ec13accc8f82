//! An upload's messages, as the `Upload` RPC takes them: a first message
//! carrying the header (and no bytes), then the file's bytes in pieces.

use std::time::Duration;

use deadbolt_proto::v1 as pb;
use futures::StreamExt;
use sha2::Digest;

/// The sha256 of `b` as 64 lowercase hex digits.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

/// The header of an upload of `body` (its sha256 and size). Tests of a
/// refused header change a field of it.
pub fn header(kind: pb::UploadKind, name: &str, file: &str, body: &[u8]) -> pb::UploadHeader {
    pb::UploadHeader {
        kind: kind as i32,
        name: name.into(),
        file: file.into(),
        sha256: sha256_hex(body),
        size: body.len() as u64,
    }
}

/// The header, then `body` in pieces of `piece` bytes.
pub fn messages(h: pb::UploadHeader, body: &[u8], piece: usize) -> Vec<pb::UploadChunk> {
    let first = pb::UploadChunk {
        header: Some(h),
        data: Vec::new(),
    };
    std::iter::once(first)
        .chain(body.chunks(piece).map(|c| pb::UploadChunk {
            header: None,
            data: c.to_vec(),
        }))
        .collect()
}

/// [`messages`] as a stream that waits `pause` before each piece (a slow
/// client).
pub fn paced(
    h: pb::UploadHeader,
    body: &[u8],
    piece: usize,
    pause: Duration,
) -> impl futures::Stream<Item = pb::UploadChunk> + Send + 'static {
    futures::stream::iter(messages(h, body, piece))
        .enumerate()
        .then(move |(i, m)| async move {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            m
        })
}
