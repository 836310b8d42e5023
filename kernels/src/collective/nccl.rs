//! The NCCL backend of [`Collective`], for ranks whose nodes have NVIDIA
//! GPUs: buffers go to the rank's device, through NCCL between the devices,
//! and back. Built only with the `cuda` feature; cudarc loads the CUDA
//! driver and NCCL at run time, so building needs no CUDA toolkit, and
//! [`devices`] says whether this machine can use the backend at all.
//!
//! One thread owns each communicator (NCCL communicators must not be used
//! from several threads): every call is sent to it as a closure and the
//! caller waits for the answer, at most the backend's timeout; past that
//! the communicator counts as broken and every later call fails, so a dead
//! peer makes the survivors fail instead of hanging.
//!
//! The trait's contract holds bit for bit, as on the ring:
//! * integer sums are exact: i64 through NCCL's integer sum, i128 cut into
//!   32-bit limbs ([`super::limbs`]) summed as i64 and put back together;
//! * float sums are taken in rank order: the ranks all-gather their buffers
//!   through NCCL and each adds the blocks in rank order, so the result is
//!   the serial loop's, whatever NCCL's topology (this moves n/2 times the
//!   bytes of NCCL's own all-reduce, whose float order depends on its ring
//!   and tree choices).

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};

use super::{Collective, CollectiveError, limbs};

/// Length of an NCCL unique id, the token every rank of one communicator
/// needs (rank 0 makes it; the coordinator hands it to the others).
pub const ID_BYTES: usize = 128;

/// Number of CUDA devices this machine can run NCCL on, or why none.
pub fn devices() -> Result<usize, String> {
    // SAFETY: only tries to open the shared libraries by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver library (libcuda.so) on this machine".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err("no NCCL library (libnccl.so) on this machine".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("the CUDA driver sees no device".into()),
        Err(e) => Err(format!("the CUDA driver failed to start: {e}")),
    }
}

/// A new NCCL unique id for a communicator this rank will be rank 0 of.
pub fn unique_id() -> Result<[u8; ID_BYTES], CollectiveError> {
    devices().map_err(CollectiveError::Backend)?;
    let id = Id::new().map_err(|e| CollectiveError::Backend(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().map(|c| c as u8))
}

/// What the owning thread holds: the device's stream and the communicator.
struct Device {
    stream: Arc<CudaStream>,
    comm: Comm,
}

type Task = Box<dyn FnOnce(&Device) + Send>;

/// One rank of an NCCL communicator.
pub struct Nccl {
    rank: usize,
    world: usize,
    timeout: Duration,
    tasks: Option<mpsc::Sender<Task>>,
    owner: Option<JoinHandle<()>>,
    broken: Option<String>,
}

fn backend(what: &str, e: impl std::fmt::Debug) -> String {
    format!("{what}: {e:?}")
}

impl Nccl {
    /// Joins the communicator `id` as `rank` of `world` on CUDA device
    /// `device`. Every rank must call this with the same id; it returns once
    /// all have joined, or fails after `timeout`.
    pub fn join(
        rank: usize,
        world: usize,
        id: [u8; ID_BYTES],
        device: usize,
        timeout: Duration,
    ) -> Result<Nccl, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(CollectiveError::BadCall(format!(
                "rank {rank} of a communicator of {world}"
            )));
        }
        let count = devices().map_err(CollectiveError::Backend)?;
        if device >= count {
            return Err(CollectiveError::Backend(format!(
                "CUDA device {device} asked for, but this machine has {count}"
            )));
        }
        let (tasks, inbox) = mpsc::channel::<Task>();
        let (ready, joined) = mpsc::channel::<Result<(), String>>();
        let owner = std::thread::Builder::new()
            .name(format!("nccl-rank-{rank}"))
            .spawn(move || {
                let open = || -> Result<Device, String> {
                    let ctx = CudaContext::new(device).map_err(|e| backend("CUDA context", e))?;
                    let stream = ctx.default_stream();
                    let id = Id::uninit(id.map(|b| b as _));
                    let comm = Comm::from_rank(stream.clone(), rank, world, id)
                        .map_err(|e| backend("ncclCommInitRank", e))?;
                    Ok(Device { stream, comm })
                };
                let dev = match open() {
                    Ok(d) => {
                        let _ = ready.send(Ok(()));
                        d
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                // Runs until the handle is dropped.
                for task in inbox {
                    task(&dev);
                }
            })
            .map_err(|e| CollectiveError::Backend(format!("cannot start the NCCL thread: {e}")))?;
        match joined.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(Nccl {
                rank,
                world,
                timeout,
                tasks: Some(tasks),
                owner: Some(owner),
                broken: None,
            }),
            Ok(Err(e)) => Err(CollectiveError::Backend(e)),
            Err(_) => Err(CollectiveError::Timeout {
                rank,
                waited: timeout,
                during: "joining the NCCL communicator".into(),
            }),
        }
    }

    /// Runs `f` on the owning thread and waits for its answer.
    fn on_device<R: Send + 'static>(
        &mut self,
        during: &str,
        f: impl FnOnce(&Device) -> Result<R, String> + Send + 'static,
    ) -> Result<R, CollectiveError> {
        if let Some(reason) = &self.broken {
            return Err(CollectiveError::Aborted {
                rank: self.rank,
                epoch: 0,
                reason: reason.clone(),
            });
        }
        let (answer, result) = mpsc::channel();
        let task: Task = Box::new(move |dev| {
            let _ = answer.send(f(dev));
        });
        let sent = self.tasks.as_ref().is_some_and(|t| t.send(task).is_ok());
        let outcome = if sent {
            match result.recv_timeout(self.timeout) {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => CollectiveError::Backend(format!("{during}: {e}")),
                Err(_) => CollectiveError::Timeout {
                    rank: self.rank,
                    waited: self.timeout,
                    during: during.into(),
                },
            }
        } else {
            CollectiveError::Backend(format!("{during}: the NCCL thread has stopped"))
        };
        self.broken = Some(outcome.to_string());
        Err(outcome)
    }

    /// Exact i64 sums through NCCL.
    fn sum_i64(&mut self, values: Vec<i64>) -> Result<Vec<i64>, CollectiveError> {
        if values.is_empty() {
            return Ok(values);
        }
        self.on_device("NCCL all-reduce (i64)", move |d| {
            let mut buf = d
                .stream
                .clone_htod(&values)
                .map_err(|e| backend("copy to device", e))?;
            d.comm
                .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
                .map_err(|e| backend("ncclAllReduce", e))?;
            d.stream
                .clone_dtoh(&buf)
                .map_err(|e| backend("copy from device", e))
        })
    }

    /// Every rank's `mine` (all of one length), concatenated by rank.
    fn gather<T>(&mut self, mine: Vec<T>, during: &str) -> Result<Vec<T>, CollectiveError>
    where
        T: NcclType + DeviceRepr + ValidAsZeroBits + Send + 'static,
    {
        if mine.is_empty() {
            return Ok(mine);
        }
        let world = self.world;
        self.on_device(during, move |d| {
            let send = d
                .stream
                .clone_htod(&mine)
                .map_err(|e| backend("copy to device", e))?;
            let mut recv = d
                .stream
                .alloc_zeros::<T>(mine.len() * world)
                .map_err(|e| backend("device allocation", e))?;
            d.comm
                .all_gather(&send, &mut recv)
                .map_err(|e| backend("ncclAllGather", e))?;
            d.stream
                .clone_dtoh(&recv)
                .map_err(|e| backend("copy from device", e))
        })
    }

    /// Sums `buf` in rank order on every rank, from an all-gather.
    fn rank_order_sum<T>(&mut self, buf: &mut [T], during: &str) -> Result<(), CollectiveError>
    where
        T: NcclType
            + DeviceRepr
            + ValidAsZeroBits
            + Send
            + Copy
            + std::ops::Add<Output = T>
            + 'static,
    {
        let n = buf.len();
        let all = self.gather(buf.to_vec(), during)?;
        if n == 0 {
            return Ok(());
        }
        let mut blocks = all.chunks_exact(n);
        if let Some(first) = blocks.next() {
            buf.copy_from_slice(first);
            for b in blocks {
                for (s, v) in buf.iter_mut().zip(b) {
                    *s = *s + *v;
                }
            }
        }
        Ok(())
    }

    fn check_owner(&self, owner: usize) -> Result<(), CollectiveError> {
        if owner >= self.world {
            return Err(CollectiveError::BadCall(format!(
                "owner {owner} outside a communicator of {}",
                self.world
            )));
        }
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Closing the channel ends the owner's loop; the communicator is
        // aborted when the thread drops it. A thread stuck in NCCL after a
        // timeout is left to the process's exit.
        self.tasks = None;
        if self.broken.is_none()
            && let Some(h) = self.owner.take()
        {
            let _ = h.join();
        }
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.rank_order_sum(buf, "NCCL all-reduce (f32)")
    }

    fn all_reduce_f64(&mut self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        self.rank_order_sum(buf, "NCCL all-reduce (f64)")
    }

    fn all_reduce_i64(&mut self, buf: &mut [i64]) -> Result<(), CollectiveError> {
        let sum = self.sum_i64(buf.to_vec())?;
        buf.copy_from_slice(&sum);
        Ok(())
    }

    fn all_reduce_i128(&mut self, buf: &mut [i128]) -> Result<(), CollectiveError> {
        let sum = self.sum_i64(limbs::split(buf))?;
        limbs::join(&sum, buf);
        Ok(())
    }

    fn reduce_f64(&mut self, buf: &mut [f64], owner: usize) -> Result<(), CollectiveError> {
        self.check_owner(owner)?;
        self.rank_order_sum(buf, "NCCL reduce (f64)")
    }

    fn reduce_i128(&mut self, buf: &mut [i128], owner: usize) -> Result<(), CollectiveError> {
        self.check_owner(owner)?;
        self.all_reduce_i128(buf)
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        self.check_owner(root)?;
        let mut len = vec![0i64];
        if self.rank == root {
            len[0] = i64::try_from(buf.len())
                .map_err(|_| CollectiveError::BadCall("broadcast too large".into()))?;
        }
        let len = self.sum_i64(len)?[0];
        let len = usize::try_from(len).map_err(|_| {
            CollectiveError::Backend(format!("broadcast length {len} from rank {root}"))
        })?;
        buf.resize(len, 0);
        if len == 0 {
            return Ok(());
        }
        let mine = std::mem::take(buf);
        *buf = self.on_device("NCCL broadcast", move |d| {
            let mut dev = d
                .stream
                .clone_htod(&mine)
                .map_err(|e| backend("copy to device", e))?;
            d.comm
                .broadcast_in_place(&mut dev, root as i32)
                .map_err(|e| backend("ncclBroadcast", e))?;
            d.stream
                .clone_dtoh(&dev)
                .map_err(|e| backend("copy from device", e))
        })?;
        Ok(())
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let len = i64::try_from(mine.len())
            .map_err(|_| CollectiveError::BadCall("all-gather block too large".into()))?;
        let lens = self.gather(vec![len], "NCCL all-gather (lengths)")?;
        let lens: Vec<usize> = lens
            .iter()
            .map(|&l| usize::try_from(l))
            .collect::<Result<_, _>>()
            .map_err(|_| CollectiveError::Backend("a rank sent a negative block length".into()))?;
        let widest = lens.iter().copied().max().unwrap_or(0);
        let mut padded = mine.to_vec();
        padded.resize(widest, 0);
        let all = self.gather(padded, "NCCL all-gather")?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &l)| all[r * widest..r * widest + l].to_vec())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A world of one: NCCL returns every input as it was (the sum of one
    /// rank), and the byte operations hand back the same bytes.
    #[test]
    fn a_world_of_one_returns_its_input() {
        if let Err(why) = devices() {
            eprintln!("skipped: NCCL needs a CUDA device: {why}");
            return;
        }
        let id = unique_id().unwrap();
        let mut c = Nccl::join(0, 1, id, 0, Duration::from_secs(60)).unwrap();
        let mut f: Vec<f32> = (0..4099).map(|i| i as f32 * 0.37 - 11.0).collect();
        let want = f.clone();
        c.all_reduce_f32(&mut f).unwrap();
        assert_eq!(f, want);
        let mut d: Vec<f64> = (0..513).map(|i| (i as f64).sqrt()).collect();
        let want = d.clone();
        c.all_reduce_f64(&mut d).unwrap();
        assert_eq!(d, want);
        let mut w: Vec<i128> = vec![i128::MIN, i128::MAX, -1, 0, 7 << 100];
        let want = w.clone();
        c.all_reduce_i128(&mut w).unwrap();
        assert_eq!(w, want);
        let mut b = b"bytes".to_vec();
        c.broadcast(&mut b, 0).unwrap();
        assert_eq!(b, b"bytes");
        assert_eq!(c.all_gather(b"abc").unwrap(), vec![b"abc".to_vec()]);
        let mut empty: Vec<f32> = Vec::new();
        c.all_reduce_f32(&mut empty).unwrap();
        assert!(c.reduce_f64(&mut d, 1).is_err());
    }

    /// Two ranks on two CUDA devices (NCCL puts one rank on a device): every
    /// operation equals the serial reference bit for bit.
    #[test]
    fn two_ranks_match_the_serial_reference() {
        match devices() {
            Err(why) => {
                eprintln!("skipped: NCCL needs a CUDA device: {why}");
                return;
            }
            Ok(n) if n < 2 => {
                eprintln!("skipped: two NCCL ranks need two CUDA devices (this machine has {n})");
                return;
            }
            Ok(_) => {}
        }
        let id = unique_id().unwrap();
        let inputs: Vec<Vec<f64>> = (0..2)
            .map(|r| (0..10_001).map(|i| (i * (r + 3)) as f64 / 7.0).collect())
            .collect();
        let want = super::super::serial_sum(&inputs);
        let got: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    let mut x = inputs[r].clone();
                    s.spawn(move || {
                        let mut c = Nccl::join(r, 2, id, r, Duration::from_secs(60)).unwrap();
                        c.all_reduce_f64(&mut x).unwrap();
                        let mut w = vec![i128::MAX / 3, -5];
                        c.all_reduce_i128(&mut w).unwrap();
                        assert_eq!(w, vec![(i128::MAX / 3) * 2, -10]);
                        x
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in got {
            assert!(g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
