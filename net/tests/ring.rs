//! The collective ring over real QUIC with mutual TLS on loopback: every
//! rank's all-reduce equals the serial rank-order sum bitwise, a rank that
//! vanishes fails every survivor within 5 s, and the survivors re-plan.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hcx_kernels::collective::{Collective, CollectiveError, Ring, serial_sum};
use hcx_net::certs::DevCerts;
use hcx_net::peer::{PeerPlane, QuicLink, RingPlan};
use hcx_net::tls::{Identity, bulk_endpoint, quinn_client_config, quinn_server_config};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::create(dir.path(), &[]).unwrap();
    certs.add_node("ring", &[], &[]).unwrap();
    dir
}

fn plane(rt: &tokio::runtime::Runtime, id: &Identity) -> PeerPlane {
    rt.block_on(async {
        let mut endpoint = bulk_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            Some(quinn_server_config(id).unwrap()),
        )
        .unwrap();
        endpoint.set_default_client_config(quinn_client_config(id).unwrap());
        PeerPlane::new(endpoint, quinn_client_config(id).unwrap(), true)
    })
}

fn join(rt: &tokio::runtime::Runtime, planes: &[&PeerPlane], epoch: u64) -> Vec<Ring<QuicLink>> {
    let members: Vec<_> = planes.iter().map(|p| p.local_addr().unwrap()).collect();
    rt.block_on(async {
        let joins = planes.iter().enumerate().map(|(rank, p)| {
            let plan = RingPlan {
                epoch,
                rank,
                members: members.clone(),
                names: Vec::new(),
            };
            async move { p.join_ring(&plan, Duration::from_secs(10)).await }
        });
        futures::future::join_all(joins).await
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

/// Runs `f` on every ring on its own thread.
fn on_ranks<R: Send + 'static>(
    rings: Vec<Ring<QuicLink>>,
    f: impl Fn(&mut Ring<QuicLink>) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let handles: Vec<_> = rings
        .into_iter()
        .map(|mut ring| {
            let f = f.clone();
            thread::spawn(move || f(&mut ring))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn spread(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let unit = (s >> 11) as f64 / (1u64 << 53) as f64;
            (unit - 0.5) * 2f64.powi((s % 40) as i32 - 20)
        })
        .collect()
}

fn same_bits32(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn quic_all_reduce_equals_the_serial_sum_on_every_rank() {
    let rt = runtime();
    let dir = certs();
    let id = Identity::load(&dir.path().join("node-ring")).unwrap();
    let planes: Vec<PeerPlane> = (0..5).map(|_| plane(&rt, &id)).collect();
    let mut epoch = 0;
    for n in [1usize, 2, 3, 5] {
        let members: Vec<&PeerPlane> = planes.iter().take(n).collect();
        for len in [0, 1, n - 1, 4096, 64 << 20] {
            if len == 64 << 20 && n == 1 {
                continue;
            }
            // A new epoch on the same planes each time: re-planning reuses them.
            epoch += 1;
            let rings = join(&rt, &members, epoch);
            let inputs: Vec<Vec<f32>> = (0..n)
                .map(|r| {
                    spread(r as u64 + len as u64, len)
                        .into_iter()
                        .map(|v| v as f32)
                        .collect()
                })
                .collect();
            let want = Arc::new(serial_sum(&inputs));
            let inputs = Arc::new(inputs);
            let w = want.clone();
            let ok = on_ranks(rings, move |ring| {
                let mut buf = inputs[ring.rank()].clone();
                ring.all_reduce_f32(&mut buf).unwrap();
                if len > 4096 {
                    return same_bits32(&buf, &w);
                }
                let mut f64s = spread(ring.rank() as u64 * 3, len);
                ring.all_reduce_f64(&mut f64s).unwrap();
                let mut bytes = if ring.rank() == 0 {
                    vec![7u8; len * 3]
                } else {
                    Vec::new()
                };
                ring.broadcast(&mut bytes, 0).unwrap();
                let gathered = ring
                    .all_gather(&vec![ring.rank() as u8; ring.rank() + len])
                    .unwrap();
                let world = ring.world();
                let want64 = serial_sum(
                    &(0..world)
                        .map(|r| spread(r as u64 * 3, len))
                        .collect::<Vec<_>>(),
                );
                same_bits32(&buf, &w)
                    && f64s
                        .iter()
                        .zip(&want64)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                    && bytes == vec![7u8; len * 3]
                    && gathered
                        .iter()
                        .enumerate()
                        .all(|(r, g)| g == &vec![r as u8; r + len])
            });
            assert!(ok.iter().all(|&x| x), "n={n} len={len}: {ok:?}");
        }
    }
}

#[test]
fn a_vanished_rank_fails_every_survivor_within_5_s_and_the_rest_re_plan() {
    let rt = runtime();
    let dir = certs();
    let id = Identity::load(&dir.path().join("node-ring")).unwrap();
    let survivors: Vec<PeerPlane> = (0..2).map(|_| plane(&rt, &id)).collect();
    // The victim runs on its own runtime, so it can vanish without a word.
    let victim_rt = runtime();
    let victim = plane(&victim_rt, &id);
    let addrs = vec![
        survivors[0].local_addr().unwrap(),
        victim.local_addr().unwrap(),
        survivors[1].local_addr().unwrap(),
    ];
    let plan = |rank| RingPlan {
        epoch: 1,
        rank,
        members: addrs.clone(),
        names: vec!["ring".into(); 3],
    };
    let victim_plan = plan(1);
    let victim_join = victim_rt.spawn(async move {
        let ring = victim
            .join_ring(&victim_plan, Duration::from_secs(10))
            .await;
        (victim, ring)
    });
    let (r0, r2) = rt.block_on(async {
        let (p0, p2) = (plan(0), plan(2));
        let (a, b) = tokio::join!(
            survivors[0].join_ring(&p0, Duration::from_secs(10)),
            survivors[1].join_ring(&p2, Duration::from_secs(10)),
        );
        (a.unwrap(), b.unwrap())
    });
    let (victim, victim_ring) = victim_rt.block_on(victim_join).unwrap();
    let victim_ring = victim_ring.unwrap();
    let work = |mut ring: Ring<QuicLink>| {
        thread::spawn(move || {
            let mut buf = vec![1.0f32; 32 << 20];
            let out = ring.all_reduce_f32(&mut buf);
            (out, Instant::now())
        })
    };
    let h0 = work(r0);
    let h2 = work(r2);
    // Frames are flowing into the victim, which never answers; then it
    // vanishes: its runtime (endpoint, streams) stops without closing
    // anything, as a killed process would.
    thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    victim_rt.shutdown_background();
    std::mem::forget(victim_ring);
    std::mem::forget(victim);
    let (e0, t0) = h0.join().unwrap();
    let (e2, t2) = h2.join().unwrap();
    assert!(e0.is_err() && e2.is_err(), "{e0:?} {e2:?}");
    for t in [t0, t2] {
        let waited = t.duration_since(killed);
        assert!(
            waited < Duration::from_secs(5),
            "a survivor hung for {waited:?}"
        );
    }
    // Re-plan: the survivors form a ring of epoch 2 and finish the work.
    let rings = join(&rt, &[&survivors[0], &survivors[1]], 2);
    let sums = on_ranks(rings, |ring| {
        let mut buf = vec![1.5f64; 1000];
        ring.all_reduce_f64(&mut buf).unwrap();
        buf[0]
    });
    assert_eq!(sums, vec![3.0, 3.0]);
}

#[test]
fn only_node_certificates_may_join() {
    let rt = runtime();
    let dir = certs();
    let node = Identity::load(&dir.path().join("node-ring")).unwrap();
    let client = Identity::load(&dir.path().join("client")).unwrap();
    let good = plane(&rt, &node);
    // An impostor with the client certificate dials the node as its right neighbour.
    let impostor = rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn_client_config(&client).unwrap());
        endpoint
    });
    let members = vec![impostor.local_addr().unwrap(), good.local_addr().unwrap()];
    let err = rt.block_on(async {
        let impostor_dial = async {
            let conn = impostor
                .connect(members[1], "127.0.0.1")
                .unwrap()
                .await
                .unwrap();
            // The node closes the connection as soon as it sees the certificate;
            // the greeting may or may not get out first.
            let Ok(mut s) = conn.open_uni().await else {
                return conn.closed().await;
            };
            let hello = hcx_kernels::collective::FrameHeader {
                op: hcx_kernels::collective::Op::Hello,
                kind: 0,
                epoch: 9,
                seq: 0,
                part: 0,
                chunk: 2,
                len: 0,
            };
            let _ = s.write_all(&hello.encode()).await;
            conn.closed().await
        };
        let plan = RingPlan {
            epoch: 9,
            rank: 1,
            members: members.clone(),
            names: Vec::new(),
        };
        let (closed, joined) =
            tokio::join!(impostor_dial, good.join_ring(&plan, Duration::from_secs(2)));
        assert!(
            closed.to_string().contains("node certificates only"),
            "{closed}"
        );
        joined.err().unwrap()
    });
    assert!(matches!(err, CollectiveError::Backend(_)), "{err}");
}

#[test]
fn a_neighbour_serving_another_role_s_certificate_is_refused() {
    let rt = runtime();
    let dir = certs();
    let node = Identity::load(&dir.path().join("node-ring")).unwrap();
    let coordinator = Identity::load(&dir.path().join("coordinator")).unwrap();
    let good = plane(&rt, &node);
    // Rank 1's address answers with a coordinator certificate (of the same
    // CA, naming 127.0.0.1, so only the role can tell).
    let impostor = rt.block_on(async {
        let endpoint = quinn::Endpoint::server(
            quinn_server_config(&coordinator).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let accept = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                if let Ok(conn) = incoming.await {
                    tokio::spawn(async move { conn.closed().await });
                }
            }
        });
        endpoint
    });
    let plan = RingPlan {
        epoch: 11,
        rank: 0,
        members: vec![good.local_addr().unwrap(), impostor.local_addr().unwrap()],
        names: Vec::new(),
    };
    let err = rt
        .block_on(good.join_ring(&plan, Duration::from_secs(5)))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("presented a coordinator certificate, not a node's"),
        "{err}"
    );
}

/// Two nodes of one cluster, `ring` and `other`, each on its own plane;
/// returns them with the folder holding their certificates and `other`'s
/// serial.
fn two_nodes(rt: &tokio::runtime::Runtime) -> (tempfile::TempDir, PeerPlane, PeerPlane, String) {
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::create(dir.path(), &[]).unwrap();
    certs.add_node("ring", &[], &[]).unwrap();
    let serial = certs.add_node("other", &[], &[]).unwrap().facts.serial;
    let a = plane(rt, &Identity::load(&certs.node("ring")).unwrap());
    let b = plane(rt, &Identity::load(&certs.node("other")).unwrap());
    (dir, a, b, serial)
}

/// Joins `a` (rank 0) and `b` (rank 1) into a ring of epoch `epoch` under
/// `names`; returns both results.
fn join_pair(
    rt: &tokio::runtime::Runtime,
    a: &PeerPlane,
    b: &PeerPlane,
    epoch: u64,
    names: &[&str],
) -> (Result<(), CollectiveError>, Result<(), CollectiveError>) {
    let members = vec![a.local_addr().unwrap(), b.local_addr().unwrap()];
    let plan = |rank| RingPlan {
        epoch,
        rank,
        members: members.clone(),
        names: names.iter().map(|n| n.to_string()).collect(),
    };
    rt.block_on(async {
        let (p0, p1) = (plan(0), plan(1));
        let (x, y) = tokio::join!(
            a.join_ring(&p0, Duration::from_secs(3)),
            b.join_ring(&p1, Duration::from_secs(3)),
        );
        (x.map(|_| ()), y.map(|_| ()))
    })
}

#[test]
fn a_neighbour_must_be_the_node_the_plan_names() {
    let rt = runtime();
    let (_dir, a, b, _) = two_nodes(&rt);
    // The plan is right: the ring forms.
    let (x, y) = join_pair(&rt, &a, &b, 21, &["ring", "other"]);
    assert!(x.is_ok() && y.is_ok(), "{x:?} {y:?}");
    // The plan names `third` at rank 1, where `other` answers: rank 0
    // refuses it by name, and rank 1 is left without its ring.
    let (x, y) = join_pair(&rt, &a, &b, 22, &["ring", "third"]);
    let e = x.unwrap_err().to_string();
    assert!(
        e.contains("rank 1") && e.contains("\"other\"") && e.contains("\"third\""),
        "{e}"
    );
    assert!(y.is_err());
}

#[test]
fn a_revoked_neighbour_is_refused_on_connecting_and_on_linking() {
    let rt = runtime();
    let (_dir, a, b, serial) = two_nodes(&rt);
    a.set_revoked([serial.clone()]);
    let (x, y) = join_pair(&rt, &a, &b, 31, &["ring", "other"]);
    let e = x.unwrap_err().to_string();
    assert!(e.contains("revoked") && e.contains(&serial), "{e}");
    // Rank 1's own dial to rank 0 was closed by rank 0's accept loop.
    assert!(y.is_err());
    // Once the serial is no longer listed, the same two link up.
    a.set_revoked(Vec::new());
    let (x, y) = join_pair(&rt, &a, &b, 32, &["ring", "other"]);
    assert!(x.is_ok() && y.is_ok(), "{x:?} {y:?}");
}
