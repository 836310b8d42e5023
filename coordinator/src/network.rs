//! Raft RPCs between coordinators over gRPC: each openraft request and its
//! result travel as openraft's own serde JSON inside a `RaftMessage`.

use std::time::Duration;

use hcx_net::proto::RaftMessage;
use hcx_net::proto::raft_client::RaftClient;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::store::{NodeId, TypeConfig};

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
                .map(RaftClient::new)
                .map_err(|e| e.to_string()),
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

impl PeerLink {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&LinkError(
                    e.clone(),
                ))));
            }
        };
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftMessage { json });
        request.set_timeout(timeout);
        let reply = match kind {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
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

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("append", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}
