//! Collective figures for docs/PERFORMANCE.md, measured in one run on
//! loopback: all-reduce (f32 sum) bus bandwidth over 2, 3 and 5 ranks linked
//! by QUIC with mutual TLS, in nccl-tests' convention
//! (busbw = bytes / time × 2(n−1)/n), beside the raw throughput of one QUIC
//! stream with the same TLS and transport settings, for 4 KiB to 256 MiB.
//!
//! `cargo bench --bench collectives` (`HCX_BENCH_MAX_MIB=64` stops at a
//! smaller buffer). Every rank is a thread of this process, so all ranks
//! share this machine's cores: on a machine with fewer cores than ranks the
//! ring is bound by the CPU that encrypts and decrypts every byte, not by
//! the network.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use hcx_kernels::collective::{Collective, Ring};
use hcx_net::certs::DevCerts;
use hcx_net::peer::{PeerPlane, QuicLink, RingPlan};
use hcx_net::tls::{Identity, bulk_endpoint, quinn_client_config, quinn_server_config};

const SIZES: [usize; 6] = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20];

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

/// Repetitions for a transfer of `bytes`: enough for about a second, at least 3.
fn reps(bytes: usize) -> usize {
    (256 << 20) / bytes.max(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Rank threads that all-reduce a buffer of the size they are sent.
fn rank_threads(rings: Vec<Ring<QuicLink>>) -> (Vec<mpsc::Sender<usize>>, mpsc::Receiver<()>) {
    let (done_tx, done_rx) = mpsc::channel();
    let mut gos = Vec::new();
    for mut ring in rings {
        let (go_tx, go_rx) = mpsc::channel::<usize>();
        let done = done_tx.clone();
        gos.push(go_tx);
        thread::spawn(move || {
            let mut buf = Vec::new();
            while let Ok(bytes) = go_rx.recv() {
                buf.resize(bytes / 4, 1.0f32);
                ring.all_reduce_f32(&mut buf).unwrap();
                done.send(()).unwrap();
            }
        });
    }
    (gos, done_rx)
}

fn stream_seconds(
    rt: &tokio::runtime::Runtime,
    id: &Identity,
    bytes: usize,
    reps: usize,
) -> Vec<f64> {
    rt.block_on(async {
        let server = bulk_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            Some(quinn_server_config(id).unwrap()),
        )
        .unwrap();
        let mut client = bulk_endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        client.set_default_client_config(quinn_client_config(id).unwrap());
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..reps {
                let mut recv = conn.accept_uni().await.unwrap();
                let mut got = 0;
                while let Some(n) = recv.read(&mut buf).await.unwrap() {
                    got += n;
                }
                assert_eq!(got, bytes);
                let mut ack = conn.open_uni().await.unwrap();
                ack.write_all(&[1]).await.unwrap();
                ack.finish().unwrap();
            }
            conn
        });
        let conn = client.connect(addr, "127.0.0.1").unwrap().await.unwrap();
        let data = vec![7u8; bytes.min(1 << 20)];
        let mut out = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let mut send = conn.open_uni().await.unwrap();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(data.len());
                send.write_all(&data[..n]).await.unwrap();
                left -= n;
            }
            send.finish().unwrap();
            let mut ack = conn.accept_uni().await.unwrap();
            ack.read_to_end(1).await.unwrap();
            out.push(t.elapsed().as_secs_f64());
        }
        let _ = accept.await;
        out
    })
}

fn fmt_bytes(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

fn main() {
    let max = std::env::var("HCX_BENCH_MAX_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(usize::MAX, |m| m << 20);
    let sizes: Vec<usize> = SIZES.into_iter().filter(|s| *s <= max).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::create(dir.path(), &[]).unwrap();
    certs.add_node("bench", &[], &[]).unwrap();
    let id = Identity::load(&certs.node("bench")).unwrap();
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    println!("collectives on loopback, {cores} cores, QUIC + TLS 1.3 (ring), f32 sum");
    println!();
    println!(
        "| bytes | one QUIC stream MB/s | ranks | time | algbw MB/s | busbw MB/s | busbw / stream |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let planes: Vec<PeerPlane> = (0..5).map(|_| plane(&rt, &id)).collect();
    let mut rings_by_n = Vec::new();
    for (epoch, n) in [2usize, 3, 5].into_iter().enumerate() {
        let members: Vec<_> = planes[..n]
            .iter()
            .map(|p| p.local_addr().unwrap())
            .collect();
        let rings: Vec<Ring<QuicLink>> = rt.block_on(async {
            let joins = planes[..n].iter().enumerate().map(|(rank, p)| {
                let plan = RingPlan {
                    epoch: epoch as u64 + 1,
                    rank,
                    members: members.clone(),
                    names: Vec::new(),
                };
                async move { p.join_ring(&plan, Duration::from_secs(10)).await.unwrap() }
            });
            futures::future::join_all(joins).await
        });
        rings_by_n.push((n, rank_threads(rings)));
    }
    for &bytes in &sizes {
        let r = reps(bytes).clamp(3, 200);
        let stream = bytes as f64 / median(stream_seconds(&rt, &id, bytes, r)) / 1e6;
        for (n, (gos, done)) in &rings_by_n {
            let mut times = Vec::new();
            for i in 0..=r {
                let t = Instant::now();
                for g in gos {
                    g.send(bytes).unwrap();
                }
                for _ in 0..*n {
                    done.recv().unwrap();
                }
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            let t = median(times);
            let algbw = bytes as f64 / t / 1e6;
            let busbw = algbw * 2.0 * (*n as f64 - 1.0) / *n as f64;
            println!(
                "| {} | {stream:.0} | {n} | {:.2} ms | {algbw:.0} | {busbw:.0} | {:.2} |",
                fmt_bytes(bytes),
                t * 1e3,
                busbw / stream
            );
        }
    }
}
