//! A collective that records each operation's time and buffer size in the
//! node's metrics (`hcx_collective_seconds`, `hcx_collective_bytes_total`,
//! by op), whichever backend carries it; bandwidth is their ratio.

use std::time::{Duration, Instant};

use hcx_kernels::collective::{Collective, CollectiveError};
use hcx_protocol::metrics as names;

/// Wraps a collective backend and measures it.
pub struct Metered(pub Box<dyn Collective>);

/// Runs `f`, recording its time and the bytes it returns alongside its
/// result (counted after the call: a broadcast's buffer is filled by it).
fn measured<T>(op: &'static str, f: impl FnOnce() -> (T, usize)) -> T {
    let t0 = Instant::now();
    let (out, bytes) = f();
    metrics::histogram!(names::COLLECTIVE_SECONDS, "op" => op).record(t0.elapsed().as_secs_f64());
    metrics::counter!(names::COLLECTIVE_BYTES, "op" => op).increment(bytes as u64);
    out
}

fn timed<T>(op: &'static str, bytes: usize, f: impl FnOnce() -> T) -> T {
    measured(op, || (f(), bytes))
}

impl Collective for Metered {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn world(&self) -> usize {
        self.0.world()
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        timed("all_reduce", size_of_val(buf), || {
            self.0.all_reduce_f32(buf)
        })
    }

    fn all_reduce_f64(&mut self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        timed("all_reduce", size_of_val(buf), || {
            self.0.all_reduce_f64(buf)
        })
    }

    fn all_reduce_i64(&mut self, buf: &mut [i64]) -> Result<(), CollectiveError> {
        timed("all_reduce", size_of_val(buf), || {
            self.0.all_reduce_i64(buf)
        })
    }

    fn all_reduce_i128(&mut self, buf: &mut [i128]) -> Result<(), CollectiveError> {
        timed("all_reduce", size_of_val(buf), || {
            self.0.all_reduce_i128(buf)
        })
    }

    fn reduce_f64(&mut self, buf: &mut [f64], owner: usize) -> Result<(), CollectiveError> {
        timed("reduce", size_of_val(buf), || self.0.reduce_f64(buf, owner))
    }

    fn reduce_i128(&mut self, buf: &mut [i128], owner: usize) -> Result<(), CollectiveError> {
        timed("reduce", size_of_val(buf), || {
            self.0.reduce_i128(buf, owner)
        })
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        measured("broadcast", || {
            let out = self.0.broadcast(buf, root);
            (out, buf.len())
        })
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        timed("all_gather", mine.len() * self.0.world(), || {
            self.0.all_gather(mine)
        })
    }

    fn pass_on(
        &mut self,
        buf: &mut Vec<u8>,
        from: usize,
        wait: Duration,
    ) -> Result<(), CollectiveError> {
        measured("pass_on", || {
            let out = self.0.pass_on(buf, from, wait);
            (out, buf.len())
        })
    }
}
