//! Bad input over the network: malformed, oversized and short frames on the
//! QUIC data plane, uploads that are not the current attempt, peers without
//! a cluster certificate, nodes asking for tensors they were not given, and
//! jobs whose paths lie outside the coordinator's roots. Each must be
//! refused on its own stream or connection while the coordinator keeps
//! serving.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hcx_coordinator::{CoordinatorConfig, CoordinatorHandle};
use hcx_net::certs::DevCerts;
use hcx_net::frames::{MAX_HEADER, Reply, Request, read_frame, write_frame};
use hcx_net::proto::cluster_client::ClusterClient;
use hcx_net::proto::{ListNodesRequest, SubmitJobRequest};
use hcx_net::tls::Identity;

/// A single-voter coordinator reading models under `dir/models` and writing
/// artifacts inside `dir/out`, with certificates (and ones naming nodes `a`
/// and `b`) in `dir/certs`.
async fn coordinator(dir: &Path) -> CoordinatorHandle {
    let certs = DevCerts::create(&dir.join("certs"), &[]).unwrap();
    for n in ["a", "b"] {
        certs.add_node(n, &[], &[]).unwrap();
    }
    for d in ["models", "out"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let h = hcx_coordinator::start(CoordinatorConfig {
        dashboard: None,
        id: 1,
        listen: "127.0.0.1:0".parse().unwrap(),
        peers: BTreeMap::from([(1, "127.0.0.1:0".to_string())]),
        data_dir: dir.join("raft"),
        tls: Some(Identity::load(&certs.coordinator()).unwrap()),
        join: false,
        retention: Default::default(),
        lease: Duration::from_secs(5),
        model_roots: vec![dir.join("models")],
        output_roots: vec![dir.join("out")],
    })
    .await
    .unwrap();
    for _ in 0..100 {
        if h.is_leader() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.is_leader(), "a single voter elects itself");
    h
}

async fn quic(
    addr: std::net::SocketAddr,
    id: &Identity,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(hcx_net::tls::quinn_client_config(id).unwrap());
    ep.connect(addr, "localhost").unwrap().await
}

/// Sends raw bytes on a new stream and reads the reply frame.
async fn raw_exchange(conn: &quinn::Connection, bytes: &[u8]) -> Reply {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    read_frame::<_, Reply>(&mut recv)
        .await
        .expect("an error reply")
}

/// Asks for a tensor on a new stream; any failure of the stream is an error.
async fn try_fetch(conn: &quinn::Connection) -> Result<Reply, String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = Request::Fetch {
        job: "j".into(),
        tensor: "t".into(),
        node: "n".into(),
    };
    write_frame(&mut s, &req).await.map_err(|e| e.to_string())?;
    read_frame::<_, Reply>(&mut r)
        .await
        .map_err(|e| e.to_string())
}

/// Asks for `tensor` of `job` as `node` on a new stream; the tensor's
/// bytes, or the error message.
async fn fetch_as(
    conn: &quinn::Connection,
    node: &str,
    job: &str,
    tensor: &str,
) -> Result<Vec<u8>, String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = Request::Fetch {
        job: job.into(),
        tensor: tensor.into(),
        node: node.into(),
    };
    write_frame(&mut s, &req).await.map_err(|e| e.to_string())?;
    let _ = s.finish();
    match read_frame::<_, Reply>(&mut r)
        .await
        .map_err(|e| e.to_string())?
    {
        Reply::Tensor { len, .. } => {
            let mut buf = vec![0u8; len as usize];
            r.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok(buf)
        }
        Reply::Error { message, .. } => Err(message),
        Reply::Stored => Err("unexpected reply".into()),
    }
}

/// Writes a one-tensor safetensors file (`w`, F32 2×2: 1, 2, 3, 4).
fn tiny_model(path: &Path) {
    model_of(path, &["w"]);
}

/// A safetensors file of 2 × 2 f32 tensors with these names, holding 1, 2,
/// 3, … in order.
fn model_of(path: &Path, names: &[&str]) {
    let entries: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                r#""{n}":{{"dtype":"F32","shape":[2,2],"data_offsets":[{},{}]}}"#,
                16 * i,
                16 * (i + 1)
            )
        })
        .collect();
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    for v in 0..4 * names.len() {
        bytes.extend((v as f32 + 1.0).to_le_bytes());
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A gRPC client of `h` presenting `id`.
fn grpc_as(h: &CoordinatorHandle, id: &Identity) -> ClusterClient<tonic::transport::Channel> {
    let ch = hcx_net::client::channel(
        &h.addr.to_string(),
        Some(&hcx_net::tls::tonic_client_tls(id)),
    )
    .unwrap();
    ClusterClient::new(ch)
}

/// Submits a job reading `model` into `output`; the job id or the refusal.
async fn submit(
    h: &CoordinatorHandle,
    certs: &Path,
    model: &Path,
    output: &Path,
) -> Result<String, tonic::Status> {
    submit_model(h, certs, serde_json::json!(model), output)
        .await
        .map(|r| r.job_id)
}

/// Submits a job whose `model` is `model` as written in the spec (a path or
/// a map) and returns the whole reply.
async fn submit_model(
    h: &CoordinatorHandle,
    certs: &Path,
    model: serde_json::Value,
    output: &Path,
) -> Result<hcx_net::proto::SubmitJobReply, tonic::Status> {
    let spec = serde_json::json!({
        "name": "t", "seed": 1, "model": model, "output": output,
        "pipeline": [{"rtn": {"bits": 8}}]
    });
    let client = Identity::load(&certs.join("client")).unwrap();
    grpc_as(h, &client)
        .submit_job(SubmitJobRequest {
            spec_json: spec.to_string(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn node_info(name: &str) -> hcx_net::proto::NodeInfo {
    hcx_net::proto::NodeInfo {
        name: name.into(),
        cores: 1,
        memory_bytes: 1 << 30,
        ..Default::default()
    }
}

fn error_text(r: Reply) -> String {
    match r {
        Reply::Error { message, .. } => message,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_stream() {
    let dir = tempfile::tempdir().unwrap();
    let h = coordinator(dir.path()).await;
    let node = Identity::load(&dir.path().join("certs/node-a")).unwrap();
    let conn = quic(h.addr, &node).await.unwrap();

    // Oversized header.
    let mut big = ((MAX_HEADER as u32) + 1).to_le_bytes().to_vec();
    big.extend([0u8; 64]);
    let msg = error_text(raw_exchange(&conn, &big).await);
    assert!(msg.contains("exceeds"), "{msg}");

    // Not an archive of a request.
    let mut junk = 16u32.to_le_bytes().to_vec();
    junk.extend([0xAB; 16]);
    let msg = error_text(raw_exchange(&conn, &junk).await);
    assert!(msg.contains("malformed"), "{msg}");

    // Header shorter than announced.
    let mut short = 100u32.to_le_bytes().to_vec();
    short.extend([1u8; 10]);
    let msg = error_text(raw_exchange(&conn, &short).await);
    assert!(msg.contains("bad request"), "{msg}");

    // The same connection still works: a well-formed request gets a real answer.
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
    let msg = error_text(read_frame(&mut recv).await.unwrap());
    assert!(msg.contains("no job"), "{msg}");

    // An upload for a shard nobody was given is refused before any byte is stored.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(
        &mut send,
        &Request::Upload {
            job: "j000001".into(),
            shard: 0,
            attempt: 1,
            node: "a".into(),
            sha256: "00".repeat(32),
            len: 1 << 40,
            bytes_in: 0,
            kernel_seconds: 0.0,
            wall_seconds: 0.0,
        },
    )
    .await
    .unwrap();
    let _ = send.write_all(&[0u8; 1024]).await;
    let msg = error_text(read_frame(&mut recv).await.unwrap());
    assert!(msg.contains("is not held by a"), "{msg}");

    // And the gRPC API still serves its clients.
    let client = Identity::load(&dir.path().join("certs/client")).unwrap();
    let ch = hcx_net::client::channel(
        &h.addr.to_string(),
        Some(&hcx_net::tls::tonic_client_tls(&client)),
    )
    .unwrap();
    ClusterClient::new(ch)
        .list_nodes(ListNodesRequest {})
        .await
        .expect("the API still answers");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_from_another_ca_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = coordinator(dir.path()).await;
    let other = dir.path().join("other");
    let other = DevCerts::create(&other, &[]).unwrap();
    other.add_node("a", &[], &[]).unwrap();
    let stranger = Identity::load(&other.node("a")).unwrap();
    // QUIC: the handshake, or the first stream, fails.
    match quic(h.addr, &stranger).await {
        Err(_) => {}
        Ok(conn) => {
            let r = try_fetch(&conn).await;
            assert!(r.is_err(), "a foreign node was served: {r:?}");
        }
    }
    // gRPC: a client certificate from another CA, and no certificate at all.
    let stranger_client = Identity::load(&other.client()).unwrap();
    let own = Identity::load(&dir.path().join("certs/client")).unwrap();
    let foreign_tls = hcx_net::tls::tonic_client_tls(&stranger_client)
        .ca_certificate(tonic::transport::Certificate::from_pem(own.ca_pem()));
    let ch = hcx_net::client::channel(&h.addr.to_string(), Some(&foreign_tls)).unwrap();
    let r = ClusterClient::new(ch).list_nodes(ListNodesRequest {}).await;
    assert!(r.is_err(), "a foreign client was served");
    let anonymous = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(own.ca_pem()))
        .domain_name("localhost");
    let ch = hcx_net::client::channel(&h.addr.to_string(), Some(&anonymous)).unwrap();
    let r = ClusterClient::new(ch).list_nodes(ListNodesRequest {}).await;
    assert!(r.is_err(), "a client without a certificate was served");
    // Our own client still gets in.
    let ch = hcx_net::client::channel(
        &h.addr.to_string(),
        Some(&hcx_net::tls::tonic_client_tls(&own)),
    )
    .unwrap();
    ClusterClient::new(ch)
        .list_nodes(ListNodesRequest {})
        .await
        .expect("own client served");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_make_only_its_own_calls() {
    let dir = tempfile::tempdir().unwrap();
    let h = coordinator(dir.path()).await;
    let certs = dir.path().join("certs");
    let grpc = |who: &str| {
        let id = Identity::load(&certs.join(who)).unwrap();
        let ch = hcx_net::client::channel(
            &h.addr.to_string(),
            Some(&hcx_net::tls::tonic_client_tls(&id)),
        )
        .unwrap();
        ClusterClient::new(ch)
    };
    let node_info = hcx_net::proto::NodeInfo {
        name: "a".into(),
        cores: 1,
        ..Default::default()
    };
    // A client certificate cannot pose as a node.
    let err = grpc("client")
        .register_node(node_info.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("needs a node certificate"), "{err}");
    // A node certificate cannot cancel jobs or drain nodes.
    let err = grpc("node-a")
        .cancel_job(hcx_net::proto::JobRef {
            job_id: "j000001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = grpc("node-a")
        .drain_node(hcx_net::proto::DrainNodeRequest {
            name: "a".into(),
            resume: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // Each role can make its own calls.
    grpc("node-a").register_node(node_info).await.unwrap();
    grpc("client")
        .drain_node(hcx_net::proto::DrainNodeRequest {
            name: "a".into(),
            resume: false,
        })
        .await
        .unwrap();
    // Only nodes use the data plane.
    let client_id = Identity::load(&certs.join("client")).unwrap();
    if let Ok(conn) = quic(h.addr, &client_id).await {
        let r = try_fetch(&conn).await;
        assert!(r.is_err(), "a client certificate was served data: {r:?}");
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_holder_of_a_shard_may_fetch_its_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let h = coordinator(dir.path()).await;
    let certs = dir.path().join("certs");
    let a = Identity::load(&certs.join("node-a")).unwrap();
    let b = Identity::load(&certs.join("node-b")).unwrap();
    // Each node registers under its own certificate; one cannot pose as the other.
    grpc_as(&h, &a).register_node(node_info("a")).await.unwrap();
    grpc_as(&h, &b).register_node(node_info("b")).await.unwrap();
    let err = grpc_as(&h, &b)
        .heartbeat(hcx_net::proto::HeartbeatRequest {
            name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("issued to node \"b\""), "{err}");
    // One tensor, one shard: placed on a (equal nodes, ties go by name).
    let model = dir.path().join("models/tiny.safetensors");
    tiny_model(&model);
    let job = submit(&h, &certs, &model, &dir.path().join("out/tiny"))
        .await
        .unwrap();
    let holder = h
        .view()
        .read(|s| s.jobs[&job].shards[0].node.clone())
        .unwrap();
    assert_eq!(holder, "a");
    let conn_b = quic(h.addr, &b).await.unwrap();
    // b asks as itself: it holds nothing of the job.
    let msg = fetch_as(&conn_b, "b", &job, "w").await.unwrap_err();
    assert!(
        msg.contains("node \"b\" holds no running shard of") && msg.contains("\"w\""),
        "{msg}"
    );
    // b claims to be a: its certificate says otherwise.
    let msg = fetch_as(&conn_b, "a", &job, "w").await.unwrap_err();
    assert!(msg.contains("issued to node \"b\""), "{msg}");
    // The holder gets the bytes, on the same coordinator, right after.
    let conn_a = quic(h.addr, &a).await.unwrap();
    let raw = fetch_as(&conn_a, "a", &job, "w").await.unwrap();
    assert_eq!(raw.len(), 16);
    assert_eq!(&raw[..4], &1.0f32.to_le_bytes());
    // And nothing outside its shard.
    let msg = fetch_as(&conn_a, "a", &job, "other").await.unwrap_err();
    assert!(msg.contains("holds no running shard"), "{msg}");
    // b's connection still works for what is its own business.
    let msg = fetch_as(&conn_b, "b", "j999999", "w").await.unwrap_err();
    assert!(msg.contains("no job"), "{msg}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_outside_the_roots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let h = coordinator(&base).await;
    let certs = base.join("certs");
    let model = base.join("models/tiny.safetensors");
    tiny_model(&model);
    let stray = base.join("elsewhere/tiny.safetensors");
    tiny_model(&stray);
    // An output outside the output root: refused, saying which path and which root.
    let err = submit(&h, &certs, &model, &base.join("elsewhere/art"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let want = format!(
        "output {} is outside the output root of this coordinator: it resolves to {}, which is not inside {} (--output-root)",
        base.join("elsewhere/art").display(),
        base.join("elsewhere/art").display(),
        base.join("out").display()
    );
    assert_eq!(err.message(), want);
    assert!(!base.join("elsewhere/art").exists());
    // Escapes by `..` and by a symbolic link.
    let err = submit(&h, &certs, &model, &base.join("out/../elsewhere/art"))
        .await
        .unwrap_err();
    assert!(err.message().contains("outside the output root"), "{err}");
    std::os::unix::fs::symlink(base.join("elsewhere"), base.join("out/link")).unwrap();
    let err = submit(&h, &certs, &model, &base.join("out/link/art"))
        .await
        .unwrap_err();
    assert!(err.message().contains("outside the output root"), "{err}");
    assert!(!base.join("elsewhere/art").exists());
    // A model outside the model roots is not read: the client is asked to
    // send it, and told why; no job is made.
    let why = format!("model {} is outside the model root", stray.display());
    let r = submit_model(&h, &certs, serde_json::json!(stray), &base.join("out/art"))
        .await
        .unwrap();
    assert!(r.model_wanted && r.job_id.is_empty(), "{r:?}");
    assert!(
        r.why.starts_with(&why) && r.why.contains(&base.join("models").display().to_string()),
        "{r:?}"
    );
    // Marked shared, it is refused outright.
    let err = submit_model(
        &h,
        &certs,
        serde_json::json!({"path": stray, "shared": true}),
        &base.join("out/art"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().starts_with(&why), "{err}");
    assert!(h.view().read(|s| s.jobs.is_empty()));
    // Inside both: accepted.
    submit(&h, &certs, &model, &base.join("out/new/art"))
        .await
        .unwrap();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_rank_0_publishes_an_nccl_id_and_only_members_read_it() {
    use hcx_net::proto::{GroupToken, GroupTokenRef, HeartbeatRequest};
    let dir = tempfile::tempdir().unwrap();
    let h = coordinator(dir.path()).await;
    let certs = dir.path().join("certs");
    let a = Identity::load(&certs.join("node-a")).unwrap();
    let b = Identity::load(&certs.join("node-b")).unwrap();
    for (id, name) in [(&a, "a"), (&b, "b")] {
        let info = hcx_net::proto::NodeInfo {
            nccl: true,
            gpu_kernels: String::new(),
            ..node_info(name)
        };
        grpc_as(&h, id).register_node(info).await.unwrap();
    }
    let model = dir.path().join("models/two.safetensors");
    // Two layers, so the calibrated job's group can have two ranks.
    model_of(&model, &["layers.0.w", "layers.1.w"]);
    let text = dir.path().join("models/calibration.txt");
    std::fs::write(&text, "Some calibration text.\n").unwrap();
    let spec = serde_json::json!({
        "name": "t", "seed": 1, "model": model, "output": dir.path().join("out/two"),
        "pipeline": [{"rtn": {"bits": 8}}],
        "calibration": {"sentences": text},
    });
    let client = Identity::load(&certs.join("client")).unwrap();
    let job = grpc_as(&h, &client)
        .submit_job(SubmitJobRequest {
            spec_json: spec.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    // Both nodes offer NCCL: the group the leader forms sums through it.
    let mut group = None;
    for _ in 0..100 {
        let r = grpc_as(&h, &a)
            .heartbeat(HeartbeatRequest {
                name: "a".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        group = r.assignments.into_iter().find_map(|x| x.group);
        if group.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let g = group.expect("a group formed");
    assert_eq!(
        (g.backend.as_str(), g.rank, g.members.len()),
        ("nccl", 0, 2)
    );
    let ask = |node: &str| GroupTokenRef {
        job_id: job.clone(),
        epoch: g.epoch,
        node: node.into(),
    };
    let token = |node: &str, epoch: u64| GroupToken {
        job_id: job.clone(),
        epoch,
        node: node.into(),
        nccl_id: vec![7; 128],
    };
    // Nothing to read before rank 0 publishes.
    let e = grpc_as(&h, &b).get_group_token(ask("b")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    // Rank 1 may not publish; rank 0 may not publish for another epoch;
    // nobody publishes under another node's name; a client cannot publish.
    let e = grpc_as(&h, &b)
        .publish_group_token(token("b", g.epoch))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("b is not rank 0"), "{e}");
    let e = grpc_as(&h, &a)
        .publish_group_token(token("a", g.epoch + 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let e = grpc_as(&h, &b)
        .publish_group_token(token("a", g.epoch))
        .await
        .unwrap_err();
    assert!(e.message().contains("issued to node \"b\""), "{e}");
    let e = grpc_as(&h, &client)
        .publish_group_token(token("a", g.epoch))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // Rank 0 publishes (twice, as a retry would); the other rank reads it.
    for _ in 0..2 {
        grpc_as(&h, &a)
            .publish_group_token(token("a", g.epoch))
            .await
            .unwrap();
    }
    let got = grpc_as(&h, &b)
        .get_group_token(ask("b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.nccl_id, got.node), (vec![7; 128], "a".to_string()));
    // Another id for the same formation is refused.
    let mut other = token("a", g.epoch);
    other.nccl_id = vec![8; 128];
    let e = grpc_as(&h, &a)
        .publish_group_token(other)
        .await
        .unwrap_err();
    assert!(e.message().contains("already has its NCCL id"), "{e}");
    h.shutdown().await;
}
