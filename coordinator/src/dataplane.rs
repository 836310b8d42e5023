//! The coordinator's side of the QUIC data plane: serves source tensors to
//! nodes and takes their finished shard files (see `hcx_net::frames`).
//!
//! Every stream is handled on its own: a malformed or oversized frame, a
//! short payload or a bad hash ends that stream with an error reply and
//! nothing else.

use std::net::SocketAddr;
use std::sync::Arc;

use hcx_net::certs::CertFacts;
use hcx_net::frames::{FrameError, Reply, Request, read_frame, write_frame};
use hcx_net::tls::{Identity, Role};
use hcx_protocol::metrics as names;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::state::{Command, JobState, ShardResult};
use crate::{CoordinatorError, Shared};

/// Shard files larger than this many times their source bytes (plus 16 MiB)
/// are refused before any byte is stored.
const MAX_GROWTH: u64 = 4;

/// Starts the QUIC endpoint on `addr` (UDP) and its accept loop.
pub(crate) fn start(
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: Option<&Identity>,
) -> Result<tokio::task::JoinHandle<()>, CoordinatorError> {
    let config = match tls {
        Some(id) => hcx_net::tls::quinn_server_config(id)?,
        None => hcx_net::insecure::quinn_server_config()?,
    };
    let endpoint = hcx_net::tls::bulk_endpoint(addr, Some(config))
        .map_err(|source| CoordinatorError::Bind { addr, source })?;
    Ok(tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::info!("data plane: refused a connection: {e}");
                        return;
                    }
                };
                let certs = conn.peer_identity().and_then(|i| {
                    i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                        .ok()
                });
                let certs: Arc<Option<Vec<_>>> = Arc::new(certs.map(|c| *c));
                let certified =
                    match shared.require_role(certs.as_deref(), &[Role::Node], "the data plane") {
                        Ok(f) => f,
                        Err(s) => {
                            tracing::info!("data plane: {}", s.message());
                            conn.close(1u32.into(), b"node certificate required");
                            return;
                        }
                    };
                let certified: Arc<Option<CertFacts>> = Arc::new(certified);
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let shared = shared.clone();
                    let certified = certified.clone();
                    let certs = certs.clone();
                    tokio::spawn(async move {
                        // A certificate revoked while the connection
                        // lasts is refused from its next stream on.
                        let certs = certs.as_deref();
                        if let Err(s) = shared.caller(certs, "the data plane") {
                            // The request (one bounded frame, waited for
                            // at most 5 s) is read before the refusal, so
                            // the peer is not still writing it when the
                            // stream is stopped: it reads the reason
                            // rather than a reset.
                            let (mut send, mut recv) = (send, recv);
                            let _ = tokio::time::timeout(
                                std::time::Duration::from_secs(5),
                                read_frame::<_, Request>(&mut recv),
                            )
                            .await;
                            reply_error(&mut send, s.message().to_string(), None).await;
                            let _ = recv_stop(recv);
                            return;
                        }
                        let certified = (*certified).as_ref();
                        if let Err(e) = serve_stream(&shared, certified, send, recv).await {
                            tracing::info!("data plane stream: {e}");
                        }
                    });
                }
            });
        }
    }))
}

async fn reply_error(send: &mut quinn::SendStream, message: String, leader: Option<String>) {
    let _ = write_frame(send, &Reply::Error { message, leader }).await;
    let _ = send.finish();
}

fn recv_stop(mut recv: quinn::RecvStream) -> Result<(), quinn::ClosedStream> {
    recv.stop(1u32.into())
}

/// Serves one stream of a connection whose certificate says `certified`
/// (`None` under `--insecure`).
async fn serve_stream(
    shared: &Arc<Shared>,
    certified: Option<&CertFacts>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), FrameError> {
    let req: Request = match read_frame(&mut recv).await {
        Ok(r) => r,
        Err(e) => {
            reply_error(&mut send, format!("bad request: {e}"), None).await;
            let _ = recv.stop(1u32.into());
            return Err(e);
        }
    };
    let claimed = match &req {
        Request::Fetch { node, .. } | Request::Upload { node, .. } => node.as_str(),
    };
    if let Err(s) = shared.require_node_name(certified, claimed, "the data plane") {
        let _ = recv.stop(1u32.into());
        reply_error(&mut send, s.message().to_string(), None).await;
        return Ok(());
    }
    match req {
        Request::Fetch { job, tensor, node } => {
            fetch(shared, &mut send, &node, &job, &tensor).await
        }
        Request::Upload {
            job,
            shard,
            attempt,
            node,
            sha256,
            len,
            bytes_in,
            kernel_seconds,
            wall_seconds,
        } => {
            let result = ShardResult {
                node,
                attempt,
                sha256,
                bytes: len,
                bytes_in,
                kernel_seconds,
                wall_seconds,
            };
            match upload(shared, &mut recv, &job, shard, result).await {
                Ok(()) => {
                    write_frame(&mut send, &Reply::Stored).await?;
                    let _ = send.finish();
                    Ok(())
                }
                Err((msg, leader)) => {
                    let _ = recv.stop(1u32.into());
                    reply_error(&mut send, msg, leader).await;
                    Ok(())
                }
            }
        }
    }
}

/// Sends a tensor to `node`, which must hold (in the raft state) a shard
/// of `job` that lists the tensor.
async fn fetch(
    shared: &Shared,
    send: &mut quinn::SendStream,
    node: &str,
    job: &str,
    tensor: &str,
) -> Result<(), FrameError> {
    let Some((spec, holds)) = shared.view.read(|s| {
        let j = s.jobs.get(job)?;
        let holds = j.state == JobState::Running
            && j.shards.iter().any(|r| {
                r.result.is_none()
                    && r.node.as_deref() == Some(node)
                    && r.shard.tensors.iter().any(|t| t == tensor)
            });
        Some((j.spec.clone(), holds))
    }) else {
        reply_error(send, format!("no job {job:?}"), None).await;
        return Ok(());
    };
    if !holds {
        reply_error(
            send,
            format!(
                "node {node:?} holds no running shard of {job} with tensor {tensor:?}; \
                 only the node a shard is assigned to may fetch its tensors"
            ),
            None,
        )
        .await;
        return Ok(());
    }
    let model_path = match shared.model_path(&spec).await {
        Ok(p) => p,
        Err(e) => {
            reply_error(send, e, None).await;
            return Ok(());
        }
    };
    let model = match shared.model(&model_path).await {
        Ok(m) => m,
        Err(e) => {
            reply_error(send, e.to_string(), None).await;
            return Ok(());
        }
    };
    let Some(t) = model.tensors.iter().find(|t| t.name == tensor) else {
        reply_error(
            send,
            format!("the model of {job} has no tensor {tensor:?}"),
            None,
        )
        .await;
        return Ok(());
    };
    let raw = model.raw(t);
    write_frame(
        send,
        &Reply::Tensor {
            dtype: hcx_pipeline::model::dtype_str(t.dtype),
            shape: t.shape.iter().map(|d| *d as u64).collect(),
            len: raw.len() as u64,
        },
    )
    .await?;
    send.write_all(raw).await.map_err(std::io::Error::from)?;
    let _ = send.finish();
    // The stream holds its own copy of what it still has to send; the
    // source's pages need not stay resident in this process.
    model.release(t);
    metrics::counter!(names::TENSORS_SERVED).increment(1);
    metrics::counter!(names::TENSOR_SERVED_BYTES).increment(raw.len() as u64);
    Ok(())
}

type UploadError = (String, Option<String>);

async fn upload(
    shared: &Arc<Shared>,
    recv: &mut quinn::RecvStream,
    job: &str,
    shard: u32,
    result: ShardResult,
) -> Result<(), UploadError> {
    if !shared.is_leader() {
        return Err((
            "this coordinator is not the leader".into(),
            shared.leader_addr(),
        ));
    }
    let limit = shared
        .view
        .read(|s| {
            let j = s.jobs.get(job)?;
            let r = j.shards.get(shard as usize)?;
            let current = r.result.is_none()
                && r.attempt == result.attempt
                && r.node.as_deref() == Some(result.node.as_str());
            current.then(|| r.shard.memory_bytes.saturating_mul(MAX_GROWTH) + (16 << 20))
        })
        .ok_or_else(|| {
            (
                format!(
                    "{job} shard {shard} attempt {} is not held by {}",
                    result.attempt, result.node
                ),
                None,
            )
        })?;
    if result.bytes > limit {
        return Err((
            format!(
                "shard of {} bytes exceeds the {limit}-byte limit for {job} shard {shard}",
                result.bytes
            ),
            None,
        ));
    }
    let dir = shared.data_dir.join("staging");
    let io = |what: &str, e: std::io::Error| (format!("{}: {what}: {e}", dir.display()), None);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| io("cannot create", e))?;
    let partial = dir.join(format!(
        "{job}-shard-{shard:05}.a{}.partial",
        result.attempt
    ));
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| io("cannot create", e))?;
    let mut hash = Sha256::new();
    let mut left = result.bytes;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = AsyncReadExt::read(recv, &mut buf[..want])
            .await
            .map_err(|e| (format!("upload of {job} shard {shard} broke: {e}"), None))?;
        if n == 0 {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err((
                format!(
                    "upload of {job} shard {shard} ended {left} bytes short of {}",
                    result.bytes
                ),
                None,
            ));
        }
        hash.update(&buf[..n]);
        file.write_all(&buf[..n])
            .await
            .map_err(|e| io("cannot write", e))?;
        left -= n as u64;
    }
    file.sync_all().await.map_err(|e| io("cannot sync", e))?;
    drop(file);
    metrics::counter!(names::SHARD_RECEIVED_BYTES).increment(result.bytes);
    let got = hex::encode(hash.finalize());
    if got != result.sha256 {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err((
            format!(
                "{job} shard {shard}: SHA-256 {got} does not match the announced {}",
                result.sha256
            ),
            None,
        ));
    }
    // Kept by content, and done only once a majority of the voters hold
    // it: a leader lost after this point leaves the shard to the next.
    // The hash was checked above while the bytes streamed in.
    let store = shared.blobs.clone();
    let p = partial.clone();
    let sha = got.clone();
    let adopted = tokio::task::spawn_blocking(move || store.adopt_hashed(&p, &sha))
        .await
        .map_err(|e| (e.to_string(), None))?;
    let _ = tokio::fs::remove_file(&partial).await;
    adopted.map_err(|e| (e.to_string(), None))?;
    shared
        .replicate(&result.sha256, result.bytes)
        .await
        .map_err(|s| (format!("{job} shard {shard}: {}", s.message()), None))?;
    shared.saw(&result.node);
    let r = shared
        .propose(Command::ShardDone {
            job: job.to_string(),
            shard,
            result,
        })
        .await
        .map_err(|s| (s.message().to_string(), shared.leader_addr()))?;
    if r.ok { Ok(()) } else { Err((r.message, None)) }
}
