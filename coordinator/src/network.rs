//! Raft RPCs between coordinators over gRPC: each openraft request and its
//! result travel as openraft's own serde JSON inside a `RaftMessage`, except
//! a snapshot chunk's data, which rides beside its JSON header as protobuf
//! bytes in a `SnapshotChunk` (serde JSON writes a byte array as a list of
//! decimal numbers, nearly four bytes on the wire per byte of snapshot).
//!
//! Both ends cap a message at [`RAFT_MESSAGE_LIMIT`]; snapshots go out in
//! chunks of [`SNAPSHOT_CHUNK_BYTES`], and an AppendEntries batch that would
//! pass the cap is sent in smaller batches.

// openraft's trait methods fix the error type (`RPCError`, over 128 bytes);
// the helpers return the same type.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use hcx_net::proto::raft_client::RaftClient;
use hcx_net::proto::{RaftMessage, SnapshotChunk};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::store::{NodeId, TypeConfig};

/// Largest raft message, encoded, that a coordinator sends or accepts
/// (16 MiB), set on the raft client and server alike.
///
/// tonic's default of 4 MiB is too small to be left implicit: a batch of
/// AppendEntries of job submissions (each carries its whole plan, every
/// tensor name) passes it. 16 MiB leaves four times that, and a snapshot
/// chunk ([`SNAPSHOT_CHUNK_BYTES`]) is a sixteenth of it; larger batches are
/// split before sending. The cap also bounds what one peer call can make a
/// coordinator buffer; the raft service refuses callers without a
/// coordinator certificate only after decoding.
pub const RAFT_MESSAGE_LIMIT: usize = 16 * 1024 * 1024;

/// Snapshot bytes per InstallSnapshot call (1 MiB): openraft's
/// `snapshot_max_chunk_size`.
///
/// Well under [`RAFT_MESSAGE_LIMIT`] (the JSON header, which holds the
/// membership, adds little), and small enough that one chunk crosses a slow
/// link within the per-call timeout; a 12 MiB snapshot is a dozen calls.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// How long one InstallSnapshot call may take, in milliseconds (5 s):
/// openraft's `install_snapshot_timeout`.
///
/// The call for the last chunk returns only once the follower has parsed
/// and stored the whole snapshot: about 0.8 s for a 15 MB state in
/// `tests/snapshot_catchup.rs` on a loaded 2-core host. At openraft's
/// default of 200 ms that call timed out and the leader sent the whole
/// snapshot again. A dead or stuck peer holds only its own replication
/// stream this long.
pub const SNAPSHOT_CHUNK_TIMEOUT_MS: u64 = 5_000;

/// Room left under [`RAFT_MESSAGE_LIMIT`] for the protobuf framing around
/// the JSON of an AppendEntries.
const FRAMING: usize = 1024;

/// How coordinators reach each other: TLS settings shared by every peer link.
#[derive(Clone)]
pub struct PeerTransport {
    tls: Option<ClientTlsConfig>,
}

impl PeerTransport {
    /// Peers are reached with `tls`, or in plaintext when `None` (loopback only).
    pub fn new(tls: Option<ClientTlsConfig>) -> PeerTransport {
        PeerTransport { tls }
    }

    /// A lazily connecting channel to `addr` (`host:port`).
    pub fn channel(&self, addr: &str) -> Result<Channel, hcx_net::client::ClientError> {
        hcx_net::client::channel(addr, self.tls.as_ref())
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerTransport {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerLink {
        PeerLink {
            target,
            client: self
                .channel(&node.addr)
                .map(|ch| {
                    RaftClient::new(ch)
                        .max_decoding_message_size(RAFT_MESSAGE_LIMIT)
                        .max_encoding_message_size(RAFT_MESSAGE_LIMIT)
                })
                .map_err(|e| e.to_string()),
        }
    }
}

/// An InstallSnapshot request without its data: the JSON part of a
/// [`SnapshotChunk`].
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotHeader {
    vote: Vote<NodeId>,
    meta: SnapshotMeta<NodeId, BasicNode>,
    offset: u64,
    done: bool,
}

impl SnapshotHeader {
    /// Splits a request into its header and its data.
    pub(crate) fn split(req: InstallSnapshotRequest<TypeConfig>) -> (SnapshotHeader, Vec<u8>) {
        let InstallSnapshotRequest {
            vote,
            meta,
            offset,
            data,
            done,
        } = req;
        (
            SnapshotHeader {
                vote,
                meta,
                offset,
                done,
            },
            data,
        )
    }

    /// The request this header and `data` were split from.
    pub(crate) fn join(self, data: Vec<u8>) -> InstallSnapshotRequest<TypeConfig> {
        InstallSnapshotRequest {
            vote: self.vote,
            meta: self.meta,
            offset: self.offset,
            data,
            done: self.done,
        }
    }
}

/// The link to one peer coordinator.
pub struct PeerLink {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LinkError(String);

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, E>>;

fn encode<T: Serialize, E: std::error::Error>(v: &T) -> RpcResult<Vec<u8>, E> {
    serde_json::to_vec(v).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

impl PeerLink {
    fn client<E: std::error::Error>(&mut self) -> RpcResult<&mut RaftClient<Channel>, E> {
        match &mut self.client {
            Ok(c) => Ok(c),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&LinkError(
                e.clone(),
            )))),
        }
    }

    /// Reads a peer's reply: openraft's `Result` as JSON.
    fn reply<Resp, E>(
        &self,
        kind: &str,
        reply: Result<tonic::Response<RaftMessage>, tonic::Status>,
    ) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply = reply.map_err(|s| {
            RPCError::Unreachable(Unreachable::new(&LinkError(format!(
                "{kind} to coordinator {}: {}",
                self.target,
                s.message()
            ))))
        })?;
        let result: Result<Resp, E> = serde_json::from_slice(&reply.into_inner().json)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(msg);
    request.set_timeout(timeout);
    request
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let json = encode(&rpc)?;
        if json.len() > RAFT_MESSAGE_LIMIT - FRAMING {
            // openraft retries at once with at most this many entries, and
            // treats a single entry that does not fit as unreachable.
            let fit = (rpc.entries.len() as u64 / 2).max(1);
            return Err(PayloadTooLarge::new_entries_hint(fit).into());
        }
        let reply = self
            .client()?
            .append_entries(request(RaftMessage { json }, option.hard_ttl()))
            .await;
        self.reply("append", reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let (header, data) = SnapshotHeader::split(rpc);
        let chunk = SnapshotChunk {
            header_json: encode(&header)?,
            data,
        };
        let reply = self
            .client()?
            .install_snapshot(request(chunk, option.hard_ttl()))
            .await;
        self.reply("snapshot", reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let json = encode(&rpc)?;
        let reply = self
            .client()?
            .vote(request(RaftMessage { json }, option.hard_ttl()))
            .await;
        self.reply("vote", reply)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    use super::*;
    use crate::state::Command;

    fn link() -> PeerLink {
        PeerLink {
            target: 2,
            client: Err("not dialled in this test".into()),
        }
    }

    fn append(entries: usize, name_bytes: usize) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: (1..=entries as u64)
                .map(|i| Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
                    payload: EntryPayload::Normal(Command::DrainNode {
                        name: "n".repeat(name_bytes),
                        draining: true,
                    }),
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn an_append_over_the_limit_asks_openraft_for_fewer_entries() {
        let opt = RPCOption::new(Duration::from_millis(100));
        // 20 entries of 1 MiB: 20 MiB of JSON, over the 16 MiB limit.
        let r = link()
            .append_entries(append(20, 1 << 20), opt.clone())
            .await;
        match r {
            Err(RPCError::PayloadTooLarge(p)) => assert_eq!(p.entries_hint(), 10),
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        // Under the limit the request goes to the (here unreachable) peer.
        let r = link().append_entries(append(10, 1 << 20), opt).await;
        assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");
    }

    #[test]
    fn a_snapshot_request_survives_the_split_into_header_and_data() {
        let req = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 4096)),
                last_membership: Default::default(),
                snapshot_id: "3-4096-1".into(),
            },
            offset: 1 << 20,
            data: (0..=255u8).cycle().take(1 << 16).collect(),
            done: true,
        };
        let (header, data) = SnapshotHeader::split(req.clone());
        let json = serde_json::to_vec(&header).unwrap();
        assert!(json.len() < 1024, "header is {} bytes", json.len());
        let back: SnapshotHeader = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.join(data), req);
    }
}
