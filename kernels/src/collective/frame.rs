//! The wire format of a collective: every message between two ranks is one
//! [`Frame`], a fixed 36-byte header followed by `len` payload bytes. The
//! header names the ring's epoch, the collective call's sequence number, the
//! operation, the element type and where in the operation the payload
//! belongs, so a rank that is out of step with its neighbour fails loudly
//! instead of adding the wrong numbers.

use std::fmt;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"HCXC";

/// Bytes in an encoded [`FrameHeader`].
pub const HEADER_BYTES: usize = 36;

/// Largest payload a frame may carry (a peer announcing more is refused
/// before anything is allocated).
pub const MAX_PAYLOAD: usize = 64 << 20;

/// What a frame is part of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Opens a link: the sender's rank in the ring, sent once per epoch.
    Hello,
    /// All-reduce, sum along the ring (part 0) or the result travelling back (part 1).
    AllReduce,
    /// Reduce to one owner rank (parts as for all-reduce).
    Reduce,
    /// Broadcast from a root rank (chunk 0 carries the length).
    Broadcast,
    /// All-gather (`part` is the ring step; chunk 0 of each part carries the length).
    AllGather,
    /// A block passed from one rank to its right neighbour only (chunk 0
    /// carries the length).
    Pass,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Hello => 0,
            Op::AllReduce => 1,
            Op::Reduce => 2,
            Op::Broadcast => 3,
            Op::AllGather => 4,
            Op::Pass => 5,
        }
    }

    fn from_code(code: u8) -> Option<Op> {
        Some(match code {
            0 => Op::Hello,
            1 => Op::AllReduce,
            2 => Op::Reduce,
            3 => Op::Broadcast,
            4 => Op::AllGather,
            5 => Op::Pass,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Hello => "hello",
            Op::AllReduce => "all-reduce",
            Op::Reduce => "reduce",
            Op::Broadcast => "broadcast",
            Op::AllGather => "all-gather",
            Op::Pass => "pass",
        })
    }
}

/// The fixed part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The operation the frame belongs to.
    pub op: Op,
    /// Element type code (see [`super::Element::KIND`]); 0 for bytes.
    pub kind: u8,
    /// The ring's epoch: a re-planned ring has a new one.
    pub epoch: u64,
    /// Which collective call on this ring (1 for the first).
    pub seq: u64,
    /// Phase or step within the operation.
    pub part: u32,
    /// Chunk index within the part.
    pub chunk: u32,
    /// Payload bytes that follow the header.
    pub len: u32,
}

/// Why a header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The first four bytes are not [`MAGIC`].
    #[error("not a collective frame (magic {0:02x?})")]
    Magic([u8; 4]),
    /// The operation code is unknown.
    #[error("unknown operation code {0}")]
    Op(u8),
    /// The payload length is over [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
}

impl FrameHeader {
    /// The 36 header bytes, little-endian.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = self.op.code();
        out[5] = self.kind;
        out[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..28].copy_from_slice(&self.part.to_le_bytes());
        out[28..32].copy_from_slice(&self.chunk.to_le_bytes());
        out[32..36].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Reads a header, refusing unknown operations and over-long payloads.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<FrameHeader, HeaderError> {
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(HeaderError::Magic(magic));
        }
        let op = Op::from_code(bytes[4]).ok_or(HeaderError::Op(bytes[4]))?;
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let len = u32_at(32);
        if len as usize > MAX_PAYLOAD {
            return Err(HeaderError::TooLong(len));
        }
        Ok(FrameHeader {
            op,
            kind: bytes[5],
            epoch: u64_at(8),
            seq: u64_at(16),
            part: u32_at(24),
            chunk: u32_at(28),
            len,
        })
    }
}

impl fmt::Display for FrameHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} #{} (epoch {}, element {}, part {}, chunk {}, {} bytes)",
            self.op, self.seq, self.epoch, self.kind, self.part, self.chunk, self.len
        )
    }
}

/// One message between neighbouring ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub header: FrameHeader,
    /// `header.len` bytes.
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Hello),
            Just(Op::AllReduce),
            Just(Op::Reduce),
            Just(Op::Broadcast),
            Just(Op::AllGather)
        ]
    }

    proptest! {
        #[test]
        fn headers_round_trip(op in op(), kind: u8, epoch: u64, seq: u64, part: u32, chunk: u32,
                              len in 0u32..=MAX_PAYLOAD as u32) {
            let h = FrameHeader { op, kind, epoch, seq, part, chunk, len };
            prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::array::uniform32(any::<u8>()), tail: [u8; 4]) {
            let mut all = [0u8; HEADER_BYTES];
            all[..32].copy_from_slice(&bytes);
            all[32..].copy_from_slice(&tail);
            let _ = FrameHeader::decode(&all);
        }
    }

    #[test]
    fn bad_headers_say_what_is_wrong() {
        let h = FrameHeader {
            op: Op::Broadcast,
            kind: 0,
            epoch: 1,
            seq: 1,
            part: 0,
            chunk: 0,
            len: 8,
        };
        let mut bytes = h.encode();
        bytes[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&bytes),
            Err(HeaderError::Magic(_))
        ));
        let mut bytes = h.encode();
        bytes[4] = 99;
        assert_eq!(FrameHeader::decode(&bytes), Err(HeaderError::Op(99)));
        let mut bytes = h.encode();
        bytes[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            FrameHeader::decode(&bytes),
            Err(HeaderError::TooLong(u32::MAX))
        );
    }
}
