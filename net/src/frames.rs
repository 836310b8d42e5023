//! The QUIC data plane's frames: one bidirectional stream per transfer,
//! opened by the node. Each side first sends a small header frame — a
//! 4-byte little-endian length, then that many bytes of an rkyv archive —
//! and then, where the header announces them, raw bytes.
//!
//! - fetch: node sends [`Request::Fetch`]; the server answers
//!   [`Reply::Tensor`] followed by exactly `len` bytes of the tensor as
//!   stored (or [`Reply::Error`]).
//! - upload: node sends [`Request::Upload`] followed by `len` bytes of the
//!   shard file; the server answers [`Reply::Stored`] once the shard's hash
//!   is committed (or [`Reply::Error`]).
//!
//! A header longer than [`MAX_HEADER`], one that is not a valid archive,
//! or a payload shorter than announced is an error for that stream only.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest header frame accepted, in bytes.
pub const MAX_HEADER: usize = 64 * 1024;

/// What a node asks of a coordinator.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Request {
    /// Send one source tensor of a job's model. Only the node holding a
    /// shard that lists the tensor is served; a node certificate that names
    /// a node must name this one.
    Fetch {
        /// Job id.
        job: String,
        /// Tensor name.
        tensor: String,
        /// The asking node's name.
        node: String,
    },
    /// Take a finished shard file.
    Upload {
        /// Job id.
        job: String,
        /// Shard id.
        shard: u32,
        /// The node's attempt number.
        attempt: u32,
        /// The node's name.
        node: String,
        /// SHA-256 of the bytes that follow, lowercase hex.
        sha256: String,
        /// Number of bytes that follow.
        len: u64,
        /// Source bytes the node fetched for it.
        bytes_in: u64,
        /// Seconds spent in the kernels.
        kernel_seconds: f64,
        /// Seconds from taking the assignment to starting the upload.
        wall_seconds: f64,
    },
}

/// What a coordinator answers.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Reply {
    /// A tensor's bytes follow.
    Tensor {
        /// Stored dtype (`F32`, `BF16`, …).
        dtype: String,
        /// Shape.
        shape: Vec<u64>,
        /// Number of bytes that follow.
        len: u64,
    },
    /// The shard is stored and its hash committed.
    Stored,
    /// The request failed.
    Error {
        /// What went wrong.
        message: String,
        /// The raft leader's address, when the request must go there.
        leader: Option<String>,
    },
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended early.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The announced header is larger than [`MAX_HEADER`].
    #[error("header frame of {0} bytes exceeds the {MAX_HEADER}-byte limit")]
    TooLarge(usize),
    /// The header is not a valid archive of the expected type.
    #[error("malformed header frame: {0}")]
    Malformed(String),
}

/// Writes one header frame.
pub async fn write_frame<W, T>(w: &mut W, value: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    let bytes =
        rkyv::to_bytes::<rancor::Error>(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_HEADER {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    w.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Reads one header frame.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, rancor::Error>>,
{
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = AlignedVec::<16>::with_capacity(len);
    buf.resize(len, 0);
    r.read_exact(&mut buf).await?;
    decode(&buf)
}

/// Decodes a header frame's bytes (without the length prefix).
pub fn decode<T>(bytes: &[u8]) -> Result<T, FrameError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, rancor::Error>>,
{
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rancor::Error>(&aligned).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    async fn roundtrip<T>(v: &T) -> T
    where
        T: rkyv::Archive
            + for<'a> rkyv::Serialize<
                rkyv::api::high::HighSerializer<
                    AlignedVec,
                    rkyv::ser::allocator::ArenaHandle<'a>,
                    rancor::Error,
                >,
            >,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
            + rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, rancor::Error>>,
    {
        let mut buf = Vec::new();
        write_frame(&mut buf, v).await.unwrap();
        let mut r = buf.as_slice();
        read_frame(&mut r).await.unwrap()
    }

    proptest! {
        #[test]
        fn requests_round_trip(job in ".{0,40}", tensor in ".{0,200}", shard: u32, attempt: u32,
                               len: u64, secs in 0.0f64..1e6) {
            let a = Request::Fetch { job: job.clone(), tensor: tensor.clone(), node: "n1".into() };
            let b = Request::Upload { job, shard, attempt, node: tensor, sha256: "ab".repeat(32),
                                      len, bytes_in: len / 2, kernel_seconds: secs, wall_seconds: secs };
            let rt = rt();
            prop_assert_eq!(rt.block_on(roundtrip(&a)), a);
            prop_assert_eq!(rt.block_on(roundtrip(&b)), b);
        }

        #[test]
        fn replies_round_trip(dtype in "[A-Z0-9]{1,5}", shape in proptest::collection::vec(any::<u64>(), 0..6),
                              len: u64, msg in ".{0,300}", leader in proptest::option::of("[0-9.:]{1,30}")) {
            let rt = rt();
            for v in [Reply::Tensor { dtype: dtype.clone(), shape: shape.clone(), len }, Reply::Stored,
                      Reply::Error { message: msg.clone(), leader: leader.clone() }] {
                prop_assert_eq!(rt.block_on(roundtrip(&v)), v);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Reply>(&bytes);
        }
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let rt = rt();
        let mut big = ((MAX_HEADER + 1) as u32).to_le_bytes().to_vec();
        big.extend(vec![0u8; 16]);
        let err = rt
            .block_on(read_frame::<_, Request>(&mut big.as_slice()))
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)), "{err}");
        let mut short = 100u32.to_le_bytes().to_vec();
        short.extend(vec![0u8; 10]);
        let err = rt
            .block_on(read_frame::<_, Request>(&mut short.as_slice()))
            .unwrap_err();
        assert!(matches!(err, FrameError::Io(_)), "{err}");
        let mut junk = 8u32.to_le_bytes().to_vec();
        junk.extend([0xff; 8]);
        let err = rt
            .block_on(read_frame::<_, Request>(&mut junk.as_slice()))
            .unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }
}
