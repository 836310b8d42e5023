//! Collectives between the ranks of a group: all-reduce (sum), reduce to an
//! owner, broadcast and all-gather, behind one [`Collective`] trait.
//!
//! [`Ring`] is the algorithm, written once over a [`Link`] (a rank's
//! outgoing path to its right neighbour and incoming path from its left):
//! [`local::group`] links ranks in one process through channels (tests), and
//! the network crate links them over QUIC. Every sum is taken **in rank
//! order**: the result is bitwise `((x₀ + x₁) + x₂) + … + xₙ₋₁` on every rank,
//! whatever the timing, so a float all-reduce equals the serial loop over the
//! ranks. The sum travels the ring once from rank 0 to rank n−1 in chunks
//! (pipelined: rank r adds chunk k while rank r+1 adds chunk k−1), and the
//! result travels on round the ring from rank n−1; each link carries the
//! buffer at most twice. The classic reduce-scatter ring sums chunk c
//! starting at rank c, so its float results depend on the chunk a value falls
//! in; this ring trades n/(n−1) more link time for the rank-order result.
//!
//! A collective fails on every rank rather than hanging: a frame out of step
//! (wrong epoch, call, operation or chunk), a lost peer or a receive timeout
//! poisons the ring and closes its links, so the neighbours fail at once and
//! the failure travels round the ring. A poisoned ring refuses further calls;
//! the group is re-planned with a new epoch.

pub mod frame;
pub mod limbs;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;

use std::time::Duration;

pub use frame::{Frame, FrameHeader, Op};

/// Whether this build and machine can run the NCCL backend: the number of
/// CUDA devices, or why not.
pub fn nccl_devices() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        nccl::devices()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this build was made without the `cuda` feature".into())
    }
}

/// Default time a rank waits for its neighbour's next frame.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Default payload of one chunk frame (the pipelining grain).
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// Why a collective failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectiveError {
    /// A neighbour sent a frame this rank did not expect at this point.
    #[error("rank {rank}: out of step with its left neighbour: expected {expected}, got {got}")]
    OutOfStep {
        /// This rank.
        rank: usize,
        /// What this rank was waiting for.
        expected: String,
        /// What arrived.
        got: String,
    },
    /// No frame arrived in time.
    #[error("rank {rank}: no frame from its left neighbour in {waited:?} during {during}")]
    Timeout {
        /// This rank.
        rank: usize,
        /// How long it waited.
        waited: Duration,
        /// The collective it was in.
        during: String,
    },
    /// A neighbour's link broke (the peer died, aborted or closed).
    #[error("rank {rank}: link to rank {peer} lost: {reason}")]
    PeerLost {
        /// This rank.
        rank: usize,
        /// The neighbour.
        peer: usize,
        /// What the transport said.
        reason: String,
    },
    /// The ring failed earlier and must be re-planned.
    #[error("rank {rank}: ring of epoch {epoch} was aborted earlier ({reason}); re-plan it")]
    Aborted {
        /// This rank.
        rank: usize,
        /// The ring's epoch.
        epoch: u64,
        /// The first failure.
        reason: String,
    },
    /// The call's arguments are inconsistent (e.g. an owner outside the ring).
    #[error("bad collective call: {0}")]
    BadCall(String),
    /// The ring could not be set up, or a device backend failed.
    #[error("collective backend: {0}")]
    Backend(String),
}

/// The operations a group of ranks can run together. Every rank of the
/// group makes the same calls in the same order with buffers of the same
/// length (except `all_gather`, whose blocks may differ).
pub trait Collective: Send {
    /// This rank, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Sums `buf` over the ranks in rank order; every rank gets the result.
    fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// As [`Collective::all_reduce_f32`], in f64.
    fn all_reduce_f64(&mut self, buf: &mut [f64]) -> Result<(), CollectiveError>;
    /// Exact (wrapping) integer sums, for fixed-point statistics.
    fn all_reduce_i64(&mut self, buf: &mut [i64]) -> Result<(), CollectiveError>;
    /// Exact (wrapping) 128-bit integer sums, for Hessian statistics.
    fn all_reduce_i128(&mut self, buf: &mut [i128]) -> Result<(), CollectiveError>;
    /// Sums `buf` in rank order into `owner`'s buffer; other ranks' buffers
    /// hold unspecified partial sums afterwards.
    fn reduce_f64(&mut self, buf: &mut [f64], owner: usize) -> Result<(), CollectiveError>;
    /// As [`Collective::reduce_f64`], for exact 128-bit sums.
    fn reduce_i128(&mut self, buf: &mut [i128], owner: usize) -> Result<(), CollectiveError>;
    /// Copies `root`'s bytes into every rank's `buf` (resized to fit).
    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError>;
    /// Every rank's block, indexed by rank.
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError>;
    /// Hands rank `from`'s bytes to rank `from + 1` (mod n), which gets them
    /// in `buf`; every other rank's `buf` is left as it is. This is how a
    /// model split into stages by layer moves its activations on. The
    /// receiver waits up to `wait` for the block to start (its sender may
    /// still be computing), then as long as for any other frame.
    ///
    /// This default goes through [`Collective::broadcast`] (correct, but
    /// the bytes visit every rank and the first frame is awaited as any
    /// other); the ring sends them over the one link between the two.
    fn pass_on(
        &mut self,
        buf: &mut Vec<u8>,
        from: usize,
        wait: Duration,
    ) -> Result<(), CollectiveError> {
        let _ = wait;
        let to = (from + 1) % self.world().max(1);
        let mut copy = if self.rank() == from {
            buf.clone()
        } else {
            Vec::new()
        };
        self.broadcast(&mut copy, from)?;
        if self.rank() == to && to != from {
            *buf = copy;
        }
        Ok(())
    }
}

/// A rank's path to its neighbours: frames go out to the right neighbour
/// (rank + 1 mod n) and come in from the left one (rank − 1 mod n), each in
/// order. `send` never waits for the receiver (it queues), so a ring never
/// deadlocks on full buffers.
pub trait Link: Send {
    /// Queues a frame for the right neighbour.
    fn send(&mut self, frame: Frame) -> Result<(), LinkError>;
    /// The next frame from the left neighbour, waiting at most `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Frame, LinkError>;
    /// Closes both directions so the neighbours fail at once.
    fn abort(&mut self, reason: &str);
}

/// A transport failure, before it is given a rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// Nothing arrived in time.
    Timeout,
    /// The peer on the named side went away.
    Lost {
        /// True for the left neighbour, false for the right one.
        left: bool,
        /// What the transport said.
        reason: String,
    },
}

/// A value a collective can sum.
pub trait Element: Copy + Send + Sync + 'static {
    /// Type code carried in frame headers.
    const KIND: u8;
    /// Bytes per value on the wire (little-endian).
    const SIZE: usize;
    /// `partial + own`, the one addition the ring makes.
    fn add(partial: Self, own: Self) -> Self;
    /// Appends the values' little-endian bytes to `out`.
    fn write_le(src: &[Self], out: &mut Vec<u8>);
    /// Reads `dst.len()` values from `bytes`.
    fn read_le(bytes: &[u8], dst: &mut [Self]);
    /// `acc[i] = bytes[i] + acc[i]` (the partial sum from the left first).
    fn add_le(bytes: &[u8], acc: &mut [Self]);
}

macro_rules! element {
    ($t:ty, $kind:expr, $add:expr) => {
        impl Element for $t {
            const KIND: u8 = $kind;
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline]
            fn add(partial: Self, own: Self) -> Self {
                let f: fn($t, $t) -> $t = $add;
                f(partial, own)
            }
            fn write_le(src: &[Self], out: &mut Vec<u8>) {
                out.reserve(src.len() * Self::SIZE);
                for v in src {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            fn read_le(bytes: &[u8], dst: &mut [Self]) {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(Self::SIZE)) {
                    *d = <$t>::from_le_bytes(b.try_into().expect("element bytes"));
                }
            }
            fn add_le(bytes: &[u8], acc: &mut [Self]) {
                for (a, b) in acc.iter_mut().zip(bytes.chunks_exact(Self::SIZE)) {
                    let partial = <$t>::from_le_bytes(b.try_into().expect("element bytes"));
                    *a = Self::add(partial, *a);
                }
            }
        }
    };
}

element!(f32, 1, |a, b| a + b);
element!(f64, 2, |a, b| a + b);
element!(i64, 3, |a, b| a.wrapping_add(b));
element!(i128, 4, |a, b| a.wrapping_add(b));

/// The serial reference every backend must match bitwise: the ranks'
/// buffers summed element by element in rank order.
pub fn serial_sum<T: Element + Default>(inputs: &[Vec<T>]) -> Vec<T> {
    let Some(first) = inputs.first() else {
        return Vec::new();
    };
    let mut acc = first.clone();
    for x in &inputs[1..] {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a = T::add(*a, v);
        }
    }
    acc
}

/// One rank of a ring: the collective algorithms over a [`Link`].
pub struct Ring<L: Link> {
    rank: usize,
    world: usize,
    epoch: u64,
    seq: u64,
    timeout: Duration,
    chunk_bytes: usize,
    link: L,
    poisoned: Option<String>,
}

/// Where the frames of one collective call are expected to come from.
struct Expect {
    op: Op,
    kind: u8,
    part: u32,
    chunk: u32,
    len: Option<usize>,
}

impl<L: Link> Ring<L> {
    /// Wraps a link as rank `rank` of `world` in the ring of `epoch`.
    pub fn new(rank: usize, world: usize, epoch: u64, link: L) -> Result<Ring<L>, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(CollectiveError::BadCall(format!(
                "rank {rank} is outside a ring of {world}"
            )));
        }
        Ok(Ring {
            rank,
            world,
            epoch,
            seq: 0,
            timeout: DEFAULT_TIMEOUT,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            link,
            poisoned: None,
        })
    }

    /// Sets how long a rank waits for its neighbour's next frame.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the chunk size in bytes (at least one element is sent per chunk).
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes.clamp(16, frame::MAX_PAYLOAD);
        self
    }

    /// The ring's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The underlying link.
    pub fn link_mut(&mut self) -> &mut L {
        &mut self.link
    }

    /// Fails the ring on purpose (as a fault would), closing its links.
    pub fn abort(&mut self, reason: &str) {
        if self.poisoned.is_none() {
            self.poisoned = Some(reason.to_string());
        }
        self.link.abort(reason);
    }

    fn right(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn left(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn begin(&mut self) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.poisoned {
            return Err(CollectiveError::Aborted {
                rank: self.rank,
                epoch: self.epoch,
                reason: reason.clone(),
            });
        }
        self.seq += 1;
        Ok(())
    }

    /// Runs one collective body; any failure poisons the ring and closes the
    /// links so every other rank fails too.
    fn guarded<R>(
        &mut self,
        body: impl FnOnce(&mut Self) -> Result<R, CollectiveError>,
    ) -> Result<R, CollectiveError> {
        self.begin()?;
        let out = body(self);
        if let Err(e) = &out {
            let reason = e.to_string();
            self.abort(&reason);
        }
        out
    }

    fn send(
        &mut self,
        op: Op,
        kind: u8,
        part: u32,
        chunk: u32,
        payload: Vec<u8>,
    ) -> Result<(), CollectiveError> {
        let header = FrameHeader {
            op,
            kind,
            epoch: self.epoch,
            seq: self.seq,
            part,
            chunk,
            len: payload.len() as u32,
        };
        self.link
            .send(Frame { header, payload })
            .map_err(|e| self.link_error(e, op))
    }

    fn link_error(&self, e: LinkError, op: Op) -> CollectiveError {
        match e {
            LinkError::Timeout => CollectiveError::Timeout {
                rank: self.rank,
                waited: self.timeout,
                during: format!("{op} #{}", self.seq),
            },
            LinkError::Lost { left, reason } => CollectiveError::PeerLost {
                rank: self.rank,
                peer: if left { self.left() } else { self.right() },
                reason,
            },
        }
    }

    fn recv(&mut self, want: Expect) -> Result<Vec<u8>, CollectiveError> {
        let frame = self
            .link
            .recv(self.timeout)
            .map_err(|e| self.link_error(e, want.op))?;
        let h = frame.header;
        let len_ok =
            want.len.is_none_or(|n| n == h.len as usize) && h.len as usize == frame.payload.len();
        if h.op != want.op
            || h.kind != want.kind
            || h.epoch != self.epoch
            || h.seq != self.seq
            || h.part != want.part
            || h.chunk != want.chunk
            || !len_ok
        {
            let expected = FrameHeader {
                op: want.op,
                kind: want.kind,
                epoch: self.epoch,
                seq: self.seq,
                part: want.part,
                chunk: want.chunk,
                len: want.len.unwrap_or(h.len as usize) as u32,
            };
            return Err(CollectiveError::OutOfStep {
                rank: self.rank,
                expected: expected.to_string(),
                got: h.to_string(),
            });
        }
        Ok(frame.payload)
    }

    fn chunk_elems<T: Element>(&self) -> usize {
        (self.chunk_bytes / T::SIZE).max(1)
    }

    fn check_owner(&self, owner: usize) -> Result<(), CollectiveError> {
        if owner >= self.world {
            return Err(CollectiveError::BadCall(format!(
                "owner rank {owner} is outside a ring of {}",
                self.world
            )));
        }
        Ok(())
    }

    /// Rank-order sum; the result reaches ranks `n−1, 0, 1, …` up to `last`
    /// (`n−2` for an all-reduce, the owner for a reduce).
    fn sum<T: Element>(
        &mut self,
        buf: &mut [T],
        op: Op,
        last: usize,
    ) -> Result<(), CollectiveError> {
        let n = self.world;
        if n == 1 {
            return Ok(());
        }
        let per = self.chunk_elems::<T>();
        let total = buf.len();
        let chunks = total.div_ceil(per);
        let (rank, kind) = (self.rank, T::KIND);
        // Part 0: the partial sum travels 0 → 1 → … → n−1, chunk by chunk.
        for c in 0..chunks {
            let piece = &mut buf[c * per..((c + 1) * per).min(total)];
            if rank > 0 {
                let bytes = self.recv(Expect {
                    op,
                    kind,
                    part: 0,
                    chunk: c as u32,
                    len: Some(piece.len() * T::SIZE),
                })?;
                T::add_le(&bytes, piece);
            }
            let mut out = Vec::new();
            T::write_le(piece, &mut out);
            if rank < n - 1 {
                self.send(op, kind, 0, c as u32, out)?;
            } else if last != n - 1 {
                // The total, on its way round the ring from rank n−1.
                self.send(op, kind, 1, c as u32, out)?;
            }
        }
        // Part 1: the total travels n−1 → 0 → 1 → … → last.
        let receives = last != n - 1 && rank != n - 1 && rank <= last;
        if receives {
            for c in 0..chunks {
                let piece = &mut buf[c * per..((c + 1) * per).min(total)];
                let bytes = self.recv(Expect {
                    op,
                    kind,
                    part: 1,
                    chunk: c as u32,
                    len: Some(piece.len() * T::SIZE),
                })?;
                T::read_le(&bytes, piece);
                if rank != last {
                    self.send(op, kind, 1, c as u32, bytes)?;
                }
            }
        }
        Ok(())
    }

    fn all_reduce<T: Element>(&mut self, buf: &mut [T]) -> Result<(), CollectiveError> {
        let last = self.world.saturating_sub(2);
        self.guarded(|r| r.sum(buf, Op::AllReduce, last))
    }

    fn reduce<T: Element>(&mut self, buf: &mut [T], owner: usize) -> Result<(), CollectiveError> {
        self.check_owner(owner)?;
        self.guarded(|r| r.sum(buf, Op::Reduce, owner))
    }

    /// Sends a byte block as a length frame and chunk frames.
    fn send_block(&mut self, op: Op, part: u32, bytes: &[u8]) -> Result<(), CollectiveError> {
        self.send(op, 0, part, 0, (bytes.len() as u64).to_le_bytes().to_vec())?;
        for (c, piece) in bytes.chunks(self.chunk_bytes).enumerate() {
            self.send(op, 0, part, c as u32 + 1, piece.to_vec())?;
        }
        Ok(())
    }

    /// Receives a block sent by [`Ring::send_block`], forwarding each frame
    /// on to the right neighbour when `forward`.
    fn recv_block(&mut self, op: Op, part: u32, forward: bool) -> Result<Vec<u8>, CollectiveError> {
        let head = self.recv_head(op, part)?;
        self.recv_chunks(op, part, head, forward)
    }

    /// The length frame of a block sent by [`Ring::send_block`].
    fn recv_head(&mut self, op: Op, part: u32) -> Result<Vec<u8>, CollectiveError> {
        self.recv(Expect {
            op,
            kind: 0,
            part,
            chunk: 0,
            len: Some(8),
        })
    }

    /// The chunks of a block whose length frame `head` has arrived.
    fn recv_chunks(
        &mut self,
        op: Op,
        part: u32,
        head: Vec<u8>,
        forward: bool,
    ) -> Result<Vec<u8>, CollectiveError> {
        let total = u64::from_le_bytes(head.as_slice().try_into().expect("8 bytes"));
        let total = usize::try_from(total).map_err(|_| CollectiveError::OutOfStep {
            rank: self.rank,
            expected: "a block this machine can hold".into(),
            got: format!("a block of {total} bytes"),
        })?;
        if forward {
            self.send(op, 0, part, 0, head)?;
        }
        // Grow as chunks arrive: a bogus length must not allocate up front.
        let mut out = Vec::with_capacity(total.min(self.chunk_bytes * 8));
        let chunks = total.div_ceil(self.chunk_bytes);
        for c in 0..chunks {
            let len = (total - c * self.chunk_bytes).min(self.chunk_bytes);
            let piece = self.recv(Expect {
                op,
                kind: 0,
                part,
                chunk: c as u32 + 1,
                len: Some(len),
            })?;
            out.extend_from_slice(&piece);
            if forward {
                self.send(op, 0, part, c as u32 + 1, piece)?;
            }
        }
        Ok(out)
    }
}

impl<L: Link> Collective for Ring<L> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce(buf)
    }

    fn all_reduce_f64(&mut self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        self.all_reduce(buf)
    }

    fn all_reduce_i64(&mut self, buf: &mut [i64]) -> Result<(), CollectiveError> {
        self.all_reduce(buf)
    }

    fn all_reduce_i128(&mut self, buf: &mut [i128]) -> Result<(), CollectiveError> {
        self.all_reduce(buf)
    }

    fn reduce_f64(&mut self, buf: &mut [f64], owner: usize) -> Result<(), CollectiveError> {
        self.reduce(buf, owner)
    }

    fn reduce_i128(&mut self, buf: &mut [i128], owner: usize) -> Result<(), CollectiveError> {
        self.reduce(buf, owner)
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        self.check_owner(root)?;
        self.guarded(|r| {
            if r.world == 1 {
                return Ok(());
            }
            if r.rank == root {
                r.send_block(Op::Broadcast, 0, buf)
            } else {
                let forward = r.right() != root;
                *buf = r.recv_block(Op::Broadcast, 0, forward)?;
                Ok(())
            }
        })
    }

    fn pass_on(
        &mut self,
        buf: &mut Vec<u8>,
        from: usize,
        wait: Duration,
    ) -> Result<(), CollectiveError> {
        self.check_owner(from)?;
        self.guarded(|r| {
            if r.world == 1 {
                return Ok(());
            }
            if r.rank == from {
                r.send_block(Op::Pass, 0, buf)
            } else if r.left() == from {
                // The sender may still be computing: wait longer for the
                // first frame only.
                let usual = r.timeout;
                r.timeout = wait.max(usual);
                let head = r.recv_head(Op::Pass, 0);
                r.timeout = usual;
                *buf = r.recv_chunks(Op::Pass, 0, head?, false)?;
                Ok(())
            } else {
                Ok(())
            }
        })
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        self.guarded(|r| {
            let n = r.world;
            let mut out = vec![Vec::new(); n];
            out[r.rank] = mine.to_vec();
            // Step s: pass on the block that arrived at step s − 1 (our own at
            // step 0) and take the next one from the left.
            for step in 0..n.saturating_sub(1) {
                let give = (r.rank + n - step) % n;
                let take = (r.rank + n - step - 1) % n;
                let block = std::mem::take(&mut out[give]);
                r.send_block(Op::AllGather, step as u32, &block)?;
                out[give] = block;
                out[take] = r.recv_block(Op::AllGather, step as u32, false)?;
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests;
