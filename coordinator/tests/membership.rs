//! Membership changes over the real gRPC/TLS transport: a dead coordinator
//! is replaced by a new one on another address (started with `join`, added
//! as a learner, made a voter, the dead one removed), after which the new
//! voter carries the group's majority.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hcx_coordinator::store::NodeId;
use hcx_coordinator::{CoordinatorConfig, CoordinatorHandle};
use hcx_net::certs::DevCerts;
use hcx_net::proto::cluster_client::ClusterClient;
use hcx_net::proto::{MembershipChange, NodeInfo};
use hcx_net::tls::Identity;

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn coordinator(
    dir: &Path,
    id: NodeId,
    peers: &BTreeMap<NodeId, String>,
    join: bool,
) -> CoordinatorHandle {
    hcx_coordinator::start(CoordinatorConfig {
        dashboard: None,
        id,
        listen: peers[&id].parse::<SocketAddr>().unwrap(),
        peers: peers.clone(),
        data_dir: dir.join(format!("c{id}")),
        tls: Some(Identity::load(&dir.join("certs/coordinator")).unwrap()),
        join,
        retention: Default::default(),
        lease: Duration::from_secs(60),
        model_roots: vec![dir.to_path_buf()],
        output_roots: vec![dir.to_path_buf()],
    })
    .await
    .unwrap()
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn grpc(addr: &str, id: &Identity) -> ClusterClient<tonic::transport::Channel> {
    let ch = hcx_net::client::channel(addr, Some(&hcx_net::tls::tonic_client_tls(id))).unwrap();
    ClusterClient::new(ch)
}

fn voters(h: &CoordinatorHandle) -> BTreeSet<NodeId> {
    h.metrics()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

/// The address of the coordinator that leads now, among `hs`.
fn leader_addr(hs: &BTreeMap<NodeId, CoordinatorHandle>) -> Option<String> {
    hs.values()
        .find(|h| h.is_leader())
        .map(|h| h.addr.to_string())
}

async fn register(hs: &BTreeMap<NodeId, CoordinatorHandle>, node: &Identity, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(addr) = leader_addr(hs) {
            let r = grpc(&addr, node)
                .register_node(NodeInfo {
                    name: name.into(),
                    cores: 1,
                    ..Default::default()
                })
                .await;
            if r.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{name} was never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_coordinator_is_replaced_by_a_new_one_on_another_address() {
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::create(&dir.path().join("certs"), &["127.0.0.2".into()]).unwrap();
    for n in ["a", "b", "c"] {
        certs.add_node(n, &[], &[]).unwrap();
    }
    let client = Identity::load(&certs.client()).unwrap();
    let node = |n: &str| Identity::load(&certs.node(n)).unwrap();
    let peers: BTreeMap<NodeId, String> = (1..=3)
        .map(|id| (id, format!("127.0.0.1:{}", free_port("127.0.0.1"))))
        .collect();
    let mut hs = BTreeMap::new();
    for id in 1..=3 {
        hs.insert(id, coordinator(dir.path(), id, &peers, false).await);
    }
    wait_for("a leader", Duration::from_secs(15), || {
        leader_addr(&hs).is_some()
    })
    .await;
    register(&hs, &node("a"), "a").await;

    // A follower dies for good.
    let dead = *hs.iter().find(|(_, h)| !h.is_leader()).unwrap().0;
    hs.remove(&dead).unwrap().shutdown().await;

    // Its replacement: a new id on another address, joining, not founding.
    let addr4 = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let own = BTreeMap::from([(4, addr4.clone())]);
    let c4 = coordinator(dir.path(), 4, &own, true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        c4.metrics().current_leader.is_none() && voters(&c4).is_empty(),
        "a joining coordinator must not found a group of its own"
    );
    hs.insert(4, c4);

    let leader = leader_addr(&hs).unwrap();
    // Only operators change the membership, and only sensibly.
    let err = grpc(&leader, &node("a"))
        .change_membership(MembershipChange {
            add: [(4, addr4.clone())].into(),
            remove: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let survivor = *hs.keys().find(|id| **id != 4).unwrap();
    for (change, code) in [
        (
            MembershipChange {
                add: [(survivor, peers[&survivor].clone())].into(),
                remove: vec![],
            },
            tonic::Code::AlreadyExists,
        ),
        (
            MembershipChange {
                add: Default::default(),
                remove: vec![9],
            },
            tonic::Code::NotFound,
        ),
        (
            MembershipChange {
                add: [(5, "no-port".into())].into(),
                remove: vec![],
            },
            tonic::Code::InvalidArgument,
        ),
    ] {
        let err = grpc(&leader, &client)
            .change_membership(change)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err}");
    }

    let said = grpc(&leader, &client)
        .change_membership(MembershipChange {
            add: [(4, addr4.clone())].into(),
            remove: vec![dead],
        })
        .await
        .unwrap()
        .into_inner()
        .message;
    let want: BTreeSet<NodeId> = hs.keys().copied().collect();
    assert!(said.contains("voters now"), "{said}");
    wait_for(
        "every coordinator to see the new voters",
        Duration::from_secs(10),
        || hs.values().all(|h| voters(h) == want),
    )
    .await;
    // The new voter caught up: it has what was committed before it joined.
    wait_for("c4 to have node a", Duration::from_secs(10), || {
        hs[&4].view().read(|s| s.nodes.contains_key("a"))
    })
    .await;

    // With one of the founders gone as well, c4 and the other founder
    // still make a majority of {survivors, 4} and commit.
    let gone = *hs.keys().find(|id| **id != 4).unwrap();
    hs.remove(&gone).unwrap().shutdown().await;
    wait_for("a leader of the two left", Duration::from_secs(20), || {
        leader_addr(&hs).is_some()
    })
    .await;
    register(&hs, &node("b"), "b").await;
    wait_for("both to have node b", Duration::from_secs(10), || {
        hs.values()
            .all(|h| h.view().read(|s| s.nodes.contains_key("b")))
    })
    .await;
    for h in hs.into_values() {
        h.shutdown().await;
    }
}
