use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::rng::SplitMix64;

/// Values over 40 binary orders of magnitude, so that summing in any other
/// order than rank order changes low bits.
fn spread_f64(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_f64() - 0.5) * 2f64.powi(rng.below(40) as i32 - 20))
        .collect()
}

fn spread_f32(seed: u64, n: usize) -> Vec<f32> {
    spread_f64(seed, n).into_iter().map(|v| v as f32).collect()
}

/// Runs `f` on every rank of an in-process ring, one thread each.
fn on_ranks<R: Send + 'static>(
    world: usize,
    chunk: usize,
    f: impl Fn(&mut Ring<local::LocalLink>) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let rings = local::group(world, 7).unwrap();
    let handles: Vec<_> = rings
        .into_iter()
        .map(|ring| {
            let f = f.clone();
            thread::spawn(move || f(&mut ring.with_chunk_bytes(chunk)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn sizes(n: usize) -> Vec<usize> {
    vec![0, 1, n - 1, 4096]
}

#[test]
fn all_reduce_equals_the_serial_rank_order_sum_bitwise() {
    for n in [1, 2, 3, 5] {
        for len in sizes(n) {
            // Small chunks so that a 4 Ki buffer travels in many pipelined frames.
            let inputs: Vec<Vec<f32>> = (0..n)
                .map(|r| spread_f32(r as u64 * 31 + len as u64, len))
                .collect();
            let want = serial_sum(&inputs);
            let ins = inputs.clone();
            let got = on_ranks(n, 1000, move |ring| {
                let mut buf = ins[ring.rank()].clone();
                ring.all_reduce_f32(&mut buf).unwrap();
                buf
            });
            for (r, g) in got.iter().enumerate() {
                let same = g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same && g.len() == want.len(),
                    "f32 n={n} len={len} rank {r} differs"
                );
            }
            let inputs: Vec<Vec<f64>> = (0..n)
                .map(|r| spread_f64(r as u64 * 17 + len as u64, len))
                .collect();
            let want = serial_sum(&inputs);
            let got = on_ranks(n, 1000, move |ring| {
                let mut buf = inputs[ring.rank()].clone();
                ring.all_reduce_f64(&mut buf).unwrap();
                buf
            });
            for (r, g) in got.iter().enumerate() {
                let same = g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same && g.len() == want.len(),
                    "f64 n={n} len={len} rank {r} differs"
                );
            }
        }
    }
}

#[test]
fn all_reduce_of_64_mi_elements_equals_the_serial_sum() {
    let len = 64 << 20;
    for n in [2, 3, 5] {
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| spread_f32(1000 + r as u64, len)).collect();
        let want = serial_sum(&inputs);
        // The test can fail: summing the ranks in reverse gives other bits.
        if n > 2 {
            let mut reversed = inputs.clone();
            reversed.reverse();
            assert_ne!(
                serial_sum(&reversed),
                want,
                "inputs too tame to tell orders apart"
            );
        }
        let inputs = std::sync::Arc::new(inputs);
        let want = std::sync::Arc::new(want);
        let ok = on_ranks(n, DEFAULT_CHUNK_BYTES, move |ring| {
            let mut buf = inputs[ring.rank()].clone();
            ring.all_reduce_f32(&mut buf).unwrap();
            buf.iter()
                .zip(want.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits())
        });
        assert!(ok.iter().all(|&x| x), "n={n}: some rank differs: {ok:?}");
    }
}

#[test]
fn integer_sums_are_exact_and_wrap() {
    for n in [1, 2, 3, 5] {
        let got = on_ranks(n, 64, move |ring| {
            let r = ring.rank() as i128;
            let mut a: Vec<i128> = (0..100)
                .map(|i| i128::MAX / 3 + r * 1_000_003 + i)
                .collect();
            ring.all_reduce_i128(&mut a).unwrap();
            let mut b: Vec<i64> = (0..33).map(|i| -(r as i64) * i).collect();
            ring.all_reduce_i64(&mut b).unwrap();
            (a, b)
        });
        let want_a: Vec<i128> = (0..100)
            .map(|i| {
                (0..n as i128).fold(0i128, |acc, r| {
                    acc.wrapping_add(i128::MAX / 3 + r * 1_000_003 + i)
                })
            })
            .collect();
        let want_b: Vec<i64> = (0..33).map(|i| -(0..n as i64).sum::<i64>() * i).collect();
        for (a, b) in got {
            assert_eq!(a, want_a);
            assert_eq!(b, want_b);
        }
    }
}

#[test]
fn reduce_lands_on_the_owner() {
    for n in [1, 2, 3, 5] {
        for owner in 0..n {
            let inputs: Vec<Vec<f64>> = (0..n).map(|r| spread_f64(r as u64 + 99, 300)).collect();
            let want = serial_sum(&inputs);
            let got = on_ranks(n, 256, move |ring| {
                let mut buf = inputs[ring.rank()].clone();
                ring.reduce_f64(&mut buf, owner).unwrap();
                // A second call on the same ring stays in step.
                let mut again = inputs[ring.rank()].clone();
                ring.reduce_f64(&mut again, owner).unwrap();
                (buf, again)
            });
            assert_eq!(got[owner].0, want, "n={n} owner={owner}");
            assert_eq!(got[owner].1, want, "n={n} owner={owner}, second call");
        }
    }
}

#[test]
fn broadcast_and_all_gather_move_bytes_of_any_length() {
    for n in [1, 2, 3, 5] {
        for root in 0..n {
            let got = on_ranks(n, 100, move |ring| {
                let mut buf = if ring.rank() == root {
                    (0..1234u32).map(|i| (i * 7 + root as u32) as u8).collect()
                } else {
                    vec![9; 3]
                };
                ring.broadcast(&mut buf, root).unwrap();
                let mine: Vec<u8> = vec![ring.rank() as u8; ring.rank() * 150];
                let all = ring.all_gather(&mine).unwrap();
                (buf, all)
            });
            let want: Vec<u8> = (0..1234u32).map(|i| (i * 7 + root as u32) as u8).collect();
            for (buf, all) in got {
                assert_eq!(buf, want);
                assert_eq!(all.len(), n);
                for (r, block) in all.iter().enumerate() {
                    assert_eq!(block, &vec![r as u8; r * 150]);
                }
            }
        }
    }
}

#[test]
fn pass_on_hands_bytes_down_a_chain_of_stages() {
    for n in [1, 2, 3, 5] {
        // Each stage appends its rank's bytes and hands the block on; the
        // next waits for it longer than the frame timeout (its sender
        // sleeps first, as a stage computing would).
        let handles: Vec<_> = local::group(n, 4)
            .unwrap()
            .into_iter()
            .map(|ring| {
                let mut ring = ring
                    .with_chunk_bytes(100)
                    .with_timeout(Duration::from_millis(200));
                thread::spawn(move || {
                    let mut buf: Vec<u8> = Vec::new();
                    for stage in 0..n - 1 {
                        if ring.rank() == stage {
                            thread::sleep(Duration::from_millis(400));
                            buf.extend(std::iter::repeat_n(stage as u8, 300));
                        }
                        ring.pass_on(&mut buf, stage, Duration::from_secs(10))
                            .unwrap();
                    }
                    (ring.rank(), buf)
                })
            })
            .collect();
        for h in handles {
            let (rank, buf) = h.join().unwrap();
            // Rank r holds what stages 0..=r added (the last adds nothing).
            let want: Vec<u8> = (0..=rank)
                .filter(|s| s + 1 < n)
                .flat_map(|s| std::iter::repeat_n(s as u8, 300))
                .collect();
            assert_eq!(buf, want, "n={n} rank {rank}");
        }
    }
}

#[test]
fn pass_on_gives_up_after_its_wait() {
    let mut rings = local::group(2, 3).unwrap();
    let b = rings.pop().unwrap();
    let sender = rings.pop().unwrap();
    let started = Instant::now();
    let mut b = b.with_timeout(Duration::from_millis(50));
    let err = b
        .pass_on(&mut Vec::new(), 0, Duration::from_millis(300))
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(err, CollectiveError::Timeout { waited, .. } if waited == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5));
    drop(sender);
}

#[test]
fn bad_owner_is_refused() {
    let mut rings = local::group(1, 1).unwrap();
    let err = rings[0].reduce_f64(&mut [1.0], 3).unwrap_err();
    assert!(err.to_string().contains("owner rank 3"), "{err}");
    assert!(local::group(0, 1).is_err());
}

#[test]
fn a_rank_that_dies_mid_collective_fails_every_survivor() {
    for n in [2, 3, 5] {
        for victim in 0..n {
            let started = Instant::now();
            let results = on_ranks(n, 4096, move |ring| {
                let mut buf = spread_f32(ring.rank() as u64, 100_000);
                if ring.rank() == victim {
                    // Send part of the first frames, then vanish.
                    ring.abort("killed");
                    return Err(CollectiveError::BadCall("victim".into()));
                }
                let first = ring.all_reduce_f32(&mut buf);
                // A failed ring refuses further calls until re-planned.
                let second = ring.all_reduce_f32(&mut buf);
                assert!(
                    matches!(second, Err(CollectiveError::Aborted { .. })),
                    "{second:?}"
                );
                first
            });
            for (r, res) in results.iter().enumerate() {
                assert!(res.is_err(), "n={n} victim={victim}: rank {r} did not fail");
            }
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }
}

#[test]
fn a_silent_neighbour_times_out_and_the_failure_travels_round() {
    let rings = local::group(3, 2).unwrap();
    let mut handles = Vec::new();
    let mut silent = None;
    for ring in rings {
        if ring.rank() == 1 {
            silent = Some(ring); // holds its links open, sends nothing
            continue;
        }
        let mut ring = ring.with_timeout(Duration::from_millis(300));
        handles.push(thread::spawn(move || {
            let mut buf = vec![1.0f64; 10];
            ring.all_reduce_f64(&mut buf)
        }));
    }
    let started = Instant::now();
    let errs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_err())
        .collect();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        errs.iter()
            .any(|e| matches!(e, CollectiveError::Timeout { .. })),
        "{errs:?}"
    );
    drop(silent);
}

#[test]
fn frames_out_of_step_fail_loudly() {
    let mut rings = local::group(2, 5).unwrap();
    let mut b = rings.pop().unwrap();
    let mut a = rings.pop().unwrap();
    // Rank 0 all-reduces while rank 1 broadcasts: rank 1 sees the wrong operation.
    let t = thread::spawn(move || {
        let mut buf = vec![1.0f32; 4];
        let _ = a.all_reduce_f32(&mut buf);
    });
    let mut bytes = Vec::new();
    let err = b.broadcast(&mut bytes, 0).unwrap_err();
    t.join().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("expected broadcast #1") && msg.contains("got all-reduce #1"),
        "{msg}"
    );
}
