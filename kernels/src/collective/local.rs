//! The in-process backend: ranks in one process (threads) linked by
//! channels. Used by tests and by a single process standing in for several
//! ranks; the algorithm is the same [`Ring`] the network backend runs.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use super::{CollectiveError, Frame, Link, LinkError, Ring};

/// A rank's channel to its right neighbour and from its left one.
pub struct LocalLink {
    to_right: Option<Sender<Frame>>,
    from_left: Option<Receiver<Frame>>,
    reason: Option<String>,
}

impl Link for LocalLink {
    fn send(&mut self, frame: Frame) -> Result<(), LinkError> {
        let lost = |reason: String| LinkError::Lost {
            left: false,
            reason,
        };
        match &self.to_right {
            Some(tx) => tx
                .send(frame)
                .map_err(|_| lost("the right neighbour has gone".into())),
            None => Err(lost(self.closed())),
        }
    }

    fn recv(&mut self, timeout: Duration) -> Result<Frame, LinkError> {
        let lost = |reason: String| LinkError::Lost { left: true, reason };
        match &self.from_left {
            Some(rx) => rx.recv_timeout(timeout).map_err(|e| match e {
                RecvTimeoutError::Timeout => LinkError::Timeout,
                RecvTimeoutError::Disconnected => lost("the left neighbour has gone".into()),
            }),
            None => Err(lost(self.closed())),
        }
    }

    fn abort(&mut self, reason: &str) {
        self.reason.get_or_insert_with(|| reason.to_string());
        self.to_right = None;
        self.from_left = None;
    }
}

impl LocalLink {
    fn closed(&self) -> String {
        format!(
            "this rank closed its links: {}",
            self.reason.as_deref().unwrap_or("aborted")
        )
    }
}

/// `world` ranks of one ring of `epoch`, linked in a circle; hand each to
/// its own thread.
pub fn group(world: usize, epoch: u64) -> Result<Vec<Ring<LocalLink>>, CollectiveError> {
    links(world)?
        .into_iter()
        .enumerate()
        .map(|(rank, link)| Ring::new(rank, world, epoch, link))
        .collect()
}

/// The links of `world` ranks in a circle, by rank (link r sends to rank
/// r + 1), for building rings over a link that wraps them (a test that
/// watches the frames between two ranks).
pub fn links(world: usize) -> Result<Vec<LocalLink>, CollectiveError> {
    if world == 0 {
        return Err(CollectiveError::BadCall(
            "a ring needs at least one rank".into(),
        ));
    }
    // Channel r carries frames from rank r to rank r + 1.
    let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..world).map(|_| mpsc::channel()).unzip();
    receivers.rotate_right(1);
    Ok(senders
        .into_iter()
        .zip(receivers)
        .map(|(tx, rx)| LocalLink {
            to_right: Some(tx),
            from_left: Some(rx),
            reason: None,
        })
        .collect())
}
