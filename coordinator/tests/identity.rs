//! Identity across a three-coordinator group over real gRPC/TLS and QUIC:
//! a node certificate cannot act as a coordinator, and a revoked
//! certificate is refused by every coordinator within one node heartbeat
//! period, on new calls and on a data-plane connection opened before.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hcx_coordinator::store::NodeId;
use hcx_coordinator::{CoordinatorConfig, CoordinatorHandle};
use hcx_net::certs::DevCerts;
use hcx_net::frames::{Reply, Request, read_frame, write_frame};
use hcx_net::proto::cluster_client::ClusterClient;
use hcx_net::proto::raft_client::RaftClient;
use hcx_net::proto::{HeartbeatRequest, NodeInfo, RaftMessage, RevokeRequest};
use hcx_net::tls::Identity;

/// `hcx-cluster node`'s default heartbeat period.
const NODE_HEARTBEAT: Duration = Duration::from_millis(500);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn group(dir: &Path) -> (Vec<CoordinatorHandle>, BTreeMap<NodeId, String>) {
    let peers: BTreeMap<NodeId, String> = (1..=3)
        .map(|id| (id, format!("127.0.0.1:{}", free_port())))
        .collect();
    let mut hs = Vec::new();
    for id in 1..=3 {
        hs.push(
            hcx_coordinator::start(CoordinatorConfig {
                dashboard: None,
                id,
                listen: peers[&id].parse::<SocketAddr>().unwrap(),
                peers: peers.clone(),
                data_dir: dir.join(format!("c{id}")),
                tls: Some(Identity::load(&dir.join("certs/coordinator")).unwrap()),
                join: false,
                retention: Default::default(),
                lease: Duration::from_secs(60),
                model_roots: vec![dir.to_path_buf()],
                output_roots: vec![dir.to_path_buf()],
            })
            .await
            .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let leaders: Vec<_> = hs.iter().map(|h| h.metrics().current_leader).collect();
        if leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "no leader all three follow");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (hs, peers)
}

fn grpc(addr: &str, id: &Identity) -> ClusterClient<tonic::transport::Channel> {
    let ch = hcx_net::client::channel(addr, Some(&hcx_net::tls::tonic_client_tls(id))).unwrap();
    ClusterClient::new(ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_are_refused_everywhere_within_a_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::create(&dir.path().join("certs"), &[]).unwrap();
    for n in ["a", "b"] {
        certs.add_node(n, &[], &[]).unwrap();
    }
    let (hs, peers) = group(dir.path()).await;
    let leader = hs.iter().find(|h| h.is_leader()).unwrap();
    let leader_addr = leader.addr.to_string();
    let a = Identity::load(&certs.node("a")).unwrap();
    let b = Identity::load(&certs.node("b")).unwrap();
    let client = Identity::load(&certs.client()).unwrap();
    for (name, id) in [("a", &a), ("b", &b)] {
        grpc(&leader_addr, id)
            .register_node(NodeInfo {
                name: name.into(),
                cores: 1,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // A node certificate cannot speak raft as a coordinator.
    let ch =
        hcx_net::client::channel(&peers[&1], Some(&hcx_net::tls::tonic_client_tls(&a))).unwrap();
    let err = RaftClient::new(ch)
        .vote(RaftMessage {
            json: b"{}".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("needs a coordinator certificate"),
        "{err}"
    );

    // A data-plane connection of a's, opened before the revocation.
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(hcx_net::tls::quinn_client_config(&a).unwrap());
    let conn = ep.connect(leader.addr, "localhost").unwrap().await.unwrap();
    let fetch = || async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_frame(
            &mut send,
            &Request::Fetch {
                job: "j999999".into(),
                tensor: "x".into(),
                node: "a".into(),
            },
        )
        .await
        .unwrap();
        send.finish().unwrap();
        match read_frame(&mut recv).await.unwrap() {
            Reply::Error { message, .. } => message,
            other => panic!("expected an error, got {other:?}"),
        }
    };
    let before = fetch().await;
    assert!(before.contains("no job"), "{before}");

    // A node cannot revoke; an operator can.
    let serial = Identity::load(&certs.node("a"))
        .unwrap()
        .facts()
        .serial
        .clone();
    let err = grpc(&leader_addr, &b)
        .revoke_certificate(RevokeRequest {
            serial: serial.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // Nor may the leader's own certificate be revoked.
    let own = Identity::load(&certs.coordinator())
        .unwrap()
        .facts()
        .serial
        .clone();
    let err = grpc(&leader_addr, &client)
        .revoke_certificate(RevokeRequest { serial: own })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");

    grpc(&leader_addr, &client)
        .revoke_certificate(RevokeRequest {
            serial: serial.to_uppercase(),
        })
        .await
        .unwrap();
    let revoked_at = Instant::now();
    let mut pending: Vec<String> = peers.values().cloned().collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for addr in pending {
            let r = grpc(&addr, &a)
                .heartbeat(HeartbeatRequest {
                    name: "a".into(),
                    ..Default::default()
                })
                .await;
            match r {
                Err(e) if e.message().contains("was revoked") => {
                    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
                }
                _ => still.push(addr),
            }
        }
        pending = still;
        assert!(
            revoked_at.elapsed() < NODE_HEARTBEAT,
            "after {:?}, {pending:?} still accept the revoked certificate",
            revoked_at.elapsed()
        );
    }
    println!(
        "every coordinator refused the revoked certificate {:?} after the revocation",
        revoked_at.elapsed()
    );
    // The open data-plane connection is refused from its next stream on.
    let after = fetch().await;
    assert!(after.contains("was revoked"), "{after}");
    // b is untouched.
    grpc(&leader_addr, &b)
        .heartbeat(HeartbeatRequest {
            name: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    ep.close(0u32.into(), b"done");
    for h in hs {
        h.shutdown().await;
    }
}

/// Issues a coordinator certificate named `name`, valid for `host` (and
/// the loopback names every server certificate has), into `certs/NAME`.
fn coordinator_cert(certs: &DevCerts, dir: &Path, name: &str, host: &str) -> Identity {
    let out = dir.join("certs").join(name);
    hcx_net::certs::issue(
        &certs.ca(),
        &out,
        &hcx_net::certs::IssueRequest {
            role: hcx_net::tls::Role::Coordinator,
            name: name.into(),
            hosts: vec![host.into()],
            labels: BTreeMap::new(),
        },
        false,
    )
    .unwrap();
    Identity::load(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_certificate_speaks_raft_only_as_the_member_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::create(&dir.path().join("certs"), &[]).unwrap();
    // Three coordinators on 127.0.0.11–13, each with its own certificate
    // for its own address only (beside the loopback names).
    let peers: BTreeMap<NodeId, String> = (1..=3u64)
        .map(|id| {
            let ip = format!("127.0.0.1{id}");
            let port = std::net::TcpListener::bind(format!("{ip}:0"))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            (id, format!("{ip}:{port}"))
        })
        .collect();
    let mut ids = BTreeMap::new();
    for id in 1..=3u64 {
        ids.insert(
            id,
            coordinator_cert(
                &certs,
                dir.path(),
                &format!("c{id}"),
                &format!("127.0.0.1{id}"),
            ),
        );
    }
    let mut hs = Vec::new();
    for id in 1..=3u64 {
        hs.push(
            hcx_coordinator::start(CoordinatorConfig {
                dashboard: None,
                id,
                listen: peers[&id].parse::<SocketAddr>().unwrap(),
                peers: peers.clone(),
                data_dir: dir.path().join(format!("c{id}")),
                tls: Some(ids[&id].clone()),
                join: false,
                retention: Default::default(),
                lease: Duration::from_secs(60),
                model_roots: vec![dir.path().to_path_buf()],
                output_roots: vec![dir.path().to_path_buf()],
            })
            .await
            .unwrap(),
        );
    }
    // The group elects a leader and commits: each member's messages carry
    // the certificate of its own address.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !hs.iter().any(|h| h.is_leader()) {
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let vote_as = |candidate: u64| {
        let v = openraft::raft::VoteRequest::<NodeId>::new(openraft::Vote::new(1, candidate), None);
        RaftMessage {
            json: serde_json::to_vec(&v).unwrap(),
        }
    };
    let raft = |id: &Identity| {
        let ch = hcx_net::client::channel(&peers[&1], Some(&hcx_net::tls::tonic_client_tls(id)))
            .unwrap();
        RaftClient::new(ch)
    };
    // A coordinator certificate for another address claims to be
    // coordinator 2.
    let rogue = coordinator_cert(&certs, dir.path(), "rogue", "127.0.0.99");
    let err = raft(&rogue).vote(vote_as(2)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("coordinator 2")
            && err.message().contains("not valid for 127.0.0.12"),
        "{err}"
    );
    // Coordinator 3's own certificate cannot speak for 2 either.
    let err = raft(&ids[&3]).vote(vote_as(2)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // Nor can anyone speak as a coordinator that is not a member.
    let err = raft(&ids[&2]).vote(vote_as(7)).await.unwrap_err();
    assert!(err.message().contains("not a member"), "{err}");
    // Coordinator 2's certificate is heard (the stale vote is answered, not
    // granted).
    raft(&ids[&2]).vote(vote_as(2)).await.unwrap();
    for h in hs {
        h.shutdown().await;
    }
}
