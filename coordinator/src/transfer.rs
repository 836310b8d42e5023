//! Moving blobs between coordinators: the leader copies every blob it is
//! given (a sent model file, a shard file, an artifact file) to the other
//! voters and counts it stored only once a majority hold it; a coordinator
//! that needs a blob it lacks (a new leader merging shards another leader
//! received) fetches it from a peer. Blobs travel as `BlobChunk` streams on
//! the cluster API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hcx_net::proto::cluster_client::ClusterClient;
use hcx_net::proto::{BlobChunk, BlobRef};
use hcx_protocol::JobSpec;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::Status;

use crate::Shared;
use crate::blobs::BlobStore;
use crate::store::NodeId;

/// Bytes of a blob per chunk on the wire (1 MiB): well under the API's
/// message limit.
pub const BLOB_CHUNK_BYTES: usize = 1 << 20;

/// How long the leader waits for a majority to hold a blob: a base, plus
/// the time the blob takes at a slow link's 20 MB/s.
fn majority_patience(bytes: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(bytes / 20_000)
}

/// Streams `sha` from this store as chunks from `offset` on, marked `peer`
/// when it is a coordinator's copy to another.
pub fn chunks(
    store: &BlobStore,
    sha: &str,
    offset: u64,
    peer: bool,
) -> Result<tokio::sync::mpsc::Receiver<Result<BlobChunk, Status>>, Status> {
    let path = store
        .path(sha)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(file_chunks(path, sha, offset, peer))
}

/// Streams the file at `path`, the bytes of blob `sha`, as chunks from
/// `offset` on (an error item ends the stream when the file cannot be read).
pub fn file_chunks(
    path: PathBuf,
    sha: &str,
    offset: u64,
    peer: bool,
) -> tokio::sync::mpsc::Receiver<Result<BlobChunk, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sha = sha.to_string();
    tokio::spawn(async move {
        let fail = |what: &str, e: std::io::Error| {
            Status::not_found(format!("blob {sha}: {}: {what}: {e}", path.display()))
        };
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(fail("cannot open", e))).await;
                return;
            }
        };
        let total = match f.metadata().await {
            Ok(m) => m.len(),
            Err(e) => {
                let _ = tx.send(Err(fail("cannot stat", e))).await;
                return;
            }
        };
        if offset > total {
            let _ = tx
                .send(Err(Status::out_of_range(format!(
                    "blob {sha} has {total} bytes; offset {offset} is past its end"
                ))))
                .await;
            return;
        }
        if let Err(e) = f.seek(std::io::SeekFrom::Start(offset)).await {
            let _ = tx.send(Err(fail("cannot seek", e))).await;
            return;
        }
        let mut at = offset;
        loop {
            let mut data = vec![0u8; BLOB_CHUNK_BYTES.min((total - at) as usize)];
            if let Err(e) = f.read_exact(&mut data).await {
                let _ = tx.send(Err(fail("cannot read", e))).await;
                return;
            }
            let n = data.len() as u64;
            let chunk = BlobChunk {
                sha256: sha.clone(),
                total,
                offset: at,
                data,
                peer,
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
            metrics::counter!(hcx_protocol::metrics::BLOB_SENT_BYTES).increment(n);
            at += n;
            if at >= total {
                return;
            }
        }
    });
    rx
}

impl Shared {
    /// The voters other than this coordinator, with their addresses.
    pub(crate) fn other_voters(&self) -> Vec<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let nodes: Vec<(NodeId, String)> = membership
            .voter_ids()
            .filter(|id| *id != self.id)
            .filter_map(|id| {
                membership
                    .get_node(&id)
                    .map(|n| n.addr.clone())
                    .or_else(|| self.peers.get(&id).cloned())
                    .map(|a| (id, a))
            })
            .collect();
        nodes
    }

    fn peer_client(&self, addr: &str) -> Result<ClusterClient<tonic::transport::Channel>, String> {
        let ch = self.transport.channel(addr).map_err(|e| e.to_string())?;
        Ok(ClusterClient::new(ch)
            .max_decoding_message_size(hcx_net::client::API_MESSAGE_LIMIT)
            .max_encoding_message_size(hcx_net::client::API_MESSAGE_LIMIT))
    }

    /// Copies the held blob `sha` to the voter at `addr` (resuming what it
    /// already holds); Ok once it holds the whole blob.
    async fn push(&self, addr: &str, sha: &str) -> Result<(), String> {
        let mut c = self.peer_client(addr)?;
        let have = c
            .blob_status(BlobRef {
                sha256: sha.to_string(),
                peer: true,
                ..Default::default()
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        if have.complete {
            return Ok(());
        }
        let rx = chunks(&self.blobs, sha, have.held, true).map_err(|s| s.message().to_string())?;
        // A stream whose source fails mid-way ends early; the peer then
        // holds a piece and answers incomplete.
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .take_while(|r| r.is_ok())
            .filter_map(|r| r.ok());
        let got = c
            .put_blob(stream)
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        if got.complete {
            Ok(())
        } else {
            Err(format!("{addr} holds {} bytes of it", got.held))
        }
    }

    /// Copies the held blob `sha` (`bytes` long) to the other voters and
    /// returns once a majority of the voters, this one included, hold it:
    /// (holders, voters). Copies to the rest go on in the background.
    pub(crate) async fn replicate(
        self: &Arc<Self>,
        sha: &str,
        bytes: u64,
    ) -> Result<(u32, u32), Status> {
        let others = self.other_voters();
        let voters = others.len() as u32 + 1;
        let need = voters / 2 + 1;
        let mut holders = 1u32;
        if holders >= need {
            return Ok((holders, voters));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(others.len().max(1));
        for (id, addr) in others {
            let me = self.clone();
            let tx = tx.clone();
            let sha = sha.to_string();
            tokio::spawn(async move {
                // A few tries: a peer restarting or briefly cut off still
                // gets its copy.
                let mut last = String::new();
                for attempt in 0..5u32 {
                    match me.push(&addr, &sha).await {
                        Ok(()) => {
                            let _ = tx.send((id, Ok(()))).await;
                            return;
                        }
                        Err(e) => last = e,
                    }
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                tracing::info!("blob {sha}: copy to coordinator {id} at {addr} failed: {last}");
                let _ = tx.send((id, Err(last))).await;
            });
        }
        drop(tx);
        let deadline = tokio::time::Instant::now() + majority_patience(bytes);
        let mut failures = Vec::new();
        while holders < need {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((_, Ok(())))) => holders += 1,
                Ok(Some((id, Err(e)))) => failures.push(format!("coordinator {id}: {e}")),
                Ok(None) | Err(_) => {
                    return Err(Status::unavailable(format!(
                        "blob {sha} is held by {holders} of {voters} coordinators, short of the majority of {need}{}{}",
                        if failures.is_empty() { "" } else { ": " },
                        failures.join("; ")
                    )));
                }
            }
        }
        Ok((holders, voters))
    }

    /// The blob `sha` on this coordinator's disk, fetched from a peer first
    /// when this one lacks it.
    pub(crate) async fn ensure_blob(&self, sha: &str) -> Result<PathBuf, String> {
        let path = self.blobs.path(sha).map_err(|e| e.to_string())?;
        if self.blobs.has(sha).map_err(|e| e.to_string())?.is_some() {
            return Ok(path);
        }
        let mut why = Vec::new();
        for (id, addr) in self.other_voters() {
            match self.pull(&addr, sha).await {
                Ok(()) => return Ok(path),
                Err(e) => why.push(format!("coordinator {id} at {addr}: {e}")),
            }
        }
        Err(format!(
            "blob {sha} is on no reachable coordinator{}{}",
            if why.is_empty() { "" } else { ": " },
            why.join("; ")
        ))
    }

    async fn pull(&self, addr: &str, sha: &str) -> Result<(), String> {
        let mut c = self.peer_client(addr)?;
        let (held, _) = self.blobs.held(sha).map_err(|e| e.to_string())?;
        let mut stream = c
            .get_blob(BlobRef {
                sha256: sha.to_string(),
                offset: held,
                job_id: String::new(),
                peer: true,
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut total = None;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        {
            if chunk.sha256 != sha {
                return Err(format!("sent a chunk of blob {} instead", chunk.sha256));
            }
            total = Some(chunk.total);
            let store = self.blobs.clone();
            let sha = sha.to_string();
            tokio::task::spawn_blocking(move || {
                store.write(&sha, chunk.total, chunk.offset, &chunk.data)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        }
        let total = match total {
            Some(t) => t,
            None => held,
        };
        let store = self.blobs.clone();
        let s = sha.to_string();
        tokio::task::spawn_blocking(move || store.finish(&s, total))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Where this coordinator reads a job's model: the job's path for a
    /// model read in place; for a sent model, a folder of its blobs under
    /// the data dir (fetched from peers where this one lacks them).
    pub(crate) async fn model_path(&self, spec: &JobSpec) -> Result<PathBuf, String> {
        let Some(sent) = &spec.model.sent else {
            return Ok(spec.model.path.clone());
        };
        let mut files = Vec::with_capacity(sent.files.len());
        for f in &sent.files {
            self.ensure_blob(&f.sha256)
                .await
                .map_err(|e| format!("model file {}: {e}", f.name))?;
            files.push((f.name.clone(), f.sha256.clone()));
        }
        let dir = self.data_dir.join("models").join(sent.digest());
        if !dir.join(".complete").is_file() {
            // One lay-out at a time: the tensor fetches of many nodes may
            // all ask a new leader for the folder at once.
            let _one = self.laying_out.lock().await;
            let store = self.blobs.clone();
            let d = dir.clone();
            tokio::task::spawn_blocking(move || store.lay_out(&d, &files))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok(match &sent.file {
            Some(f) => dir.join(f),
            None => dir,
        })
    }
}

use tokio_stream::StreamExt;
