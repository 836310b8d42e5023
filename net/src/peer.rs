//! The node-to-node plane: each node serves QUIC on its listen address and
//! the ranks of a collective group link up over it, each rank connecting to
//! its right neighbour and accepting its left one. With TLS, both ends must
//! present a node certificate signed by the cluster CA and not revoked,
//! and a ring neighbour must be the node its plan names at that rank;
//! anything else is closed before it can speak.
//!
//! [`PeerPlane::join_ring`] turns a planned group into a
//! [`Ring`](hcx_kernels::collective::Ring) over [`QuicLink`]s: the same
//! collective algorithm as in-process, with frames on one unidirectional
//! stream per direction. Each link has a writer task (an unbounded queue, so
//! a rank never blocks on sending) and a reader task (a short bounded queue,
//! so QUIC flow control holds back a sender that runs ahead). Ring
//! connections keep alive every 500 ms and time out after 3 s of silence, so
//! a neighbour that vanishes without a word is noticed within 3 s; aborting
//! closes both connections, which the neighbours see at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hcx_kernels::collective::frame::{FrameHeader, HEADER_BYTES};
use hcx_kernels::collective::{CollectiveError, Frame, Link, LinkError, Op, Ring};
use tokio::sync::{mpsc, oneshot};

use crate::tls::Role;

/// QUIC application error code a rank closes its ring connections with
/// when a collective fails.
pub const ABORT_CODE: u32 = 0x4843;

/// Keep-alive interval of ring connections.
pub const RING_KEEP_ALIVE: Duration = Duration::from_millis(500);

/// A ring connection silent this long is dead.
pub const RING_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Frames a reader may hold before QUIC flow control pushes back.
const READ_QUEUE: usize = 32;

/// Who a rank is in a planned collective group: the group's epoch, this
/// rank, and every member's node-to-node address and node name by rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingPlan {
    /// Changes whenever the group is re-planned.
    pub epoch: u64,
    /// This node's rank.
    pub rank: usize,
    /// Every rank's address, indexed by rank.
    pub members: Vec<SocketAddr>,
    /// Every rank's node name (its certificate's), indexed by rank: with
    /// TLS each neighbour must present the certificate of the node the plan
    /// names. Empty: any node certificate will do.
    pub names: Vec<String>,
}

type Arrival = (quinn::Connection, quinn::RecvStream);
type Key = (u64, usize);

#[derive(Default)]
struct Pending {
    /// Ranks waiting for their left neighbour.
    waiting: HashMap<Key, oneshot::Sender<Arrival>>,
    /// Neighbours that arrived before anyone waited.
    arrived: HashMap<Key, Arrival>,
}

/// A node's QUIC endpoint for node-to-node traffic, with the task that
/// accepts incoming connections and hands them to the ring they belong to.
pub struct PeerPlane {
    endpoint: quinn::Endpoint,
    ring_client: quinn::ClientConfig,
    pending: Arc<Mutex<Pending>>,
    accept: tokio::task::JoinHandle<()>,
    /// Whether peers must present node certificates (TLS mode).
    require_node_certs: bool,
    /// Serials the coordinators have revoked (from every heartbeat): a peer
    /// presenting one is refused.
    revoked: Revoked,
}

type Revoked = Arc<std::sync::RwLock<std::collections::HashSet<String>>>;

impl Drop for PeerPlane {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl PeerPlane {
    /// Serves on `endpoint` (which must have a server config) and connects
    /// out with `client`. With `require_node_certs`, only peers presenting a
    /// cluster node certificate are accepted (TLS mode); without, any peer
    /// is (the loopback-only insecure mode).
    pub fn new(
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        require_node_certs: bool,
    ) -> PeerPlane {
        let mut ring_client = client;
        let mut transport = crate::tls::bulk_transport_config();
        transport
            .keep_alive_interval(Some(RING_KEEP_ALIVE))
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(RING_IDLE_TIMEOUT).expect("3 s fits"),
            ));
        ring_client.transport_config(Arc::new(transport));
        let pending = Arc::new(Mutex::new(Pending::default()));
        let revoked = Revoked::default();
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            pending.clone(),
            require_node_certs,
            revoked.clone(),
        ));
        PeerPlane {
            endpoint,
            ring_client,
            pending,
            accept,
            require_node_certs,
            revoked,
        }
    }

    /// Replaces the set of revoked certificate serials (as the coordinators
    /// send it with every heartbeat): from now on a peer presenting one is
    /// refused, on connecting and on linking into a ring.
    pub fn set_revoked(&self, serials: impl IntoIterator<Item = String>) {
        let new: std::collections::HashSet<String> = serials.into_iter().collect();
        let mut r = self.revoked.write().expect("revoked lock");
        if *r != new {
            *r = new;
        }
    }

    /// Checks the certificate a neighbour presented (TLS mode): a node's,
    /// not revoked, and the one of the node the plan names at that rank.
    /// Closes the connection and says why otherwise.
    fn check_neighbour(
        &self,
        conn: &quinn::Connection,
        plan: &RingPlan,
        rank: usize,
    ) -> Result<(), CollectiveError> {
        if !self.require_node_certs {
            return Ok(());
        }
        let at = format!("rank {rank} at {}", plan.members[rank]);
        crate::tls::require_connection_role(conn, Role::Node)
            .map_err(|e| CollectiveError::Backend(format!("{at} {e}")))?;
        let facts = crate::tls::connection_facts(conn);
        let refuse = |why: String| {
            conn.close(quinn::VarInt::from_u32(ABORT_CODE), b"refused certificate");
            Err(CollectiveError::Backend(format!("{at} {why}")))
        };
        let Some(facts) = facts else {
            return refuse("presented a certificate this cluster did not issue".into());
        };
        if self
            .revoked
            .read()
            .expect("revoked lock")
            .contains(&facts.serial)
        {
            return refuse(format!(
                "presented certificate {} of node {:?}, which is revoked",
                facts.serial, facts.name
            ));
        }
        match plan.names.get(rank) {
            Some(want) if *want != facts.name => refuse(format!(
                "presented the certificate of node {:?}, but the plan names {want:?} there",
                facts.name
            )),
            _ => Ok(()),
        }
    }

    /// The address the plane serves on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Links this node into the ring `plan` describes, waiting at most
    /// `timeout` for the neighbours. The returned ring is driven from a
    /// blocking thread (not a runtime worker): its calls wait on the network.
    pub async fn join_ring(
        &self,
        plan: &RingPlan,
        timeout: Duration,
    ) -> Result<Ring<QuicLink>, CollectiveError> {
        let world = plan.members.len();
        if plan.rank >= world {
            return Err(CollectiveError::BadCall(format!(
                "rank {} is outside a ring of {world}",
                plan.rank
            )));
        }
        if plan.names.len() != world && !plan.names.is_empty() {
            return Err(CollectiveError::BadCall(format!(
                "the plan names {} nodes for a ring of {world}",
                plan.names.len()
            )));
        }
        let handle = tokio::runtime::Handle::current();
        if world == 1 {
            return Ring::new(0, 1, plan.epoch, QuicLink::alone(handle));
        }
        let right = (plan.rank + 1) % world;
        let left = (plan.rank + world - 1) % world;
        let backend = |what: String| CollectiveError::Backend(what);
        // Register for the left neighbour before dialling, so its hello is
        // never missed.
        let (tx, rx) = oneshot::channel();
        let early = {
            let mut p = self.pending.lock().expect("pending lock");
            match p.arrived.remove(&(plan.epoch, left)) {
                Some(a) => Some(a),
                None => {
                    p.waiting.insert((plan.epoch, left), tx);
                    None
                }
            }
        };
        let dial = async {
            let addr = plan.members[right];
            let conn = self
                .endpoint
                .connect_with(self.ring_client.clone(), addr, &addr.ip().to_string())
                .map_err(|e| backend(format!("cannot dial rank {right} at {addr}: {e}")))?
                .await
                .map_err(|e| backend(format!("cannot reach rank {right} at {addr}: {e}")))?;
            // The certificate names the address (checked in the handshake);
            // it must also be the planned node's, and not revoked.
            self.check_neighbour(&conn, plan, right)?;
            let mut send = conn
                .open_uni()
                .await
                .map_err(|e| backend(format!("no stream to rank {right} at {addr}: {e}")))?;
            let hello = FrameHeader {
                op: Op::Hello,
                kind: 0,
                epoch: plan.epoch,
                seq: 0,
                part: plan.rank as u32,
                chunk: world as u32,
                len: 0,
            };
            send.write_all(&hello.encode())
                .await
                .map_err(|e| backend(format!("cannot greet rank {right} at {addr}: {e}")))?;
            Ok::<_, CollectiveError>((conn, send))
        };
        let wait_left = async {
            match early {
                Some(a) => Ok(a),
                None => rx
                    .await
                    .map_err(|_| backend("the node-to-node plane has stopped".into())),
            }
        };
        let joined =
            tokio::time::timeout(timeout, async { tokio::try_join!(dial, wait_left) }).await;
        let ((right_conn, send), (left_conn, recv)) = match joined {
            Ok(r) => r?,
            Err(_) => {
                self.pending
                    .lock()
                    .expect("pending lock")
                    .waiting
                    .remove(&(plan.epoch, left));
                return Err(CollectiveError::Backend(format!(
                    "rank {} of epoch {}: neighbours did not link up within {timeout:?}",
                    plan.rank, plan.epoch
                )));
            }
        };
        if let Err(e) = self.check_neighbour(&left_conn, plan, left) {
            right_conn.close(quinn::VarInt::from_u32(ABORT_CODE), b"ring refused");
            return Err(e);
        }
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::channel(READ_QUEUE);
        tokio::spawn(write_frames(send, out_rx));
        tokio::spawn(read_frames(recv, in_tx));
        let link = QuicLink {
            handle,
            out: Some(out_tx),
            incoming: in_rx,
            conns: vec![right_conn, left_conn],
        };
        Ring::new(plan.rank, world, plan.epoch, link)
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    pending: Arc<Mutex<Pending>>,
    require_node: bool,
    revoked: Revoked,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (pending, revoked) = (pending.clone(), revoked.clone());
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            if require_node && !is_node(&conn) {
                conn.close(
                    quinn::VarInt::from_u32(ABORT_CODE),
                    b"node certificates only",
                );
                return;
            }
            if require_node
                && crate::tls::connection_facts(&conn)
                    .is_some_and(|f| revoked.read().expect("revoked lock").contains(&f.serial))
            {
                conn.close(quinn::VarInt::from_u32(ABORT_CODE), b"revoked certificate");
                return;
            }
            let Ok(Ok(mut recv)) = tokio::time::timeout(RING_IDLE_TIMEOUT, conn.accept_uni()).await
            else {
                return;
            };
            let mut head = [0u8; HEADER_BYTES];
            if recv.read_exact(&mut head).await.is_err() {
                return;
            }
            let hello = match FrameHeader::decode(&head) {
                Ok(h) if h.op == Op::Hello => h,
                _ => {
                    conn.close(
                        quinn::VarInt::from_u32(ABORT_CODE),
                        b"expected a ring hello",
                    );
                    return;
                }
            };
            let key = (hello.epoch, hello.part as usize);
            let mut p = pending.lock().expect("pending lock");
            match p.waiting.remove(&key) {
                Some(tx) => {
                    let _ = tx.send((conn, recv));
                }
                None => {
                    p.arrived.insert(key, (conn, recv));
                }
            }
        });
    }
}

fn is_node(conn: &quinn::Connection) -> bool {
    crate::tls::connection_role(conn) == Some(Role::Node)
}

async fn write_frames(mut send: quinn::SendStream, mut out: mpsc::UnboundedReceiver<Frame>) {
    while let Some(frame) = out.recv().await {
        if send.write_all(&frame.header.encode()).await.is_err()
            || send.write_all(&frame.payload).await.is_err()
        {
            return;
        }
    }
    // Keep the connection until the peer has every byte: dropping the last
    // handle closes it at once, which could cut off frames still in flight.
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(RING_IDLE_TIMEOUT, send.stopped()).await;
    }
}

async fn read_frames(
    mut recv: quinn::RecvStream,
    incoming: mpsc::Sender<Result<Frame, LinkError>>,
) {
    let lost = |reason: String| Err(LinkError::Lost { left: true, reason });
    loop {
        let mut head = [0u8; HEADER_BYTES];
        if let Err(e) = recv.read_exact(&mut head).await {
            let _ = incoming.send(lost(e.to_string())).await;
            return;
        }
        let header = match FrameHeader::decode(&head) {
            Ok(h) => h,
            Err(e) => {
                let _ = incoming.send(lost(format!("bad frame: {e}"))).await;
                return;
            }
        };
        let mut payload = vec![0u8; header.len as usize];
        if let Err(e) = recv.read_exact(&mut payload).await {
            let _ = incoming.send(lost(e.to_string())).await;
            return;
        }
        if incoming.send(Ok(Frame { header, payload })).await.is_err() {
            return;
        }
    }
}

/// A rank's QUIC streams to its neighbours, driven synchronously by
/// [`Ring`] from a blocking thread.
pub struct QuicLink {
    handle: tokio::runtime::Handle,
    out: Option<mpsc::UnboundedSender<Frame>>,
    incoming: mpsc::Receiver<Result<Frame, LinkError>>,
    conns: Vec<quinn::Connection>,
}

impl QuicLink {
    /// The link of a one-rank ring, which never sends.
    fn alone(handle: tokio::runtime::Handle) -> QuicLink {
        QuicLink {
            handle,
            out: None,
            incoming: mpsc::channel(1).1,
            conns: Vec::new(),
        }
    }
}

impl Link for QuicLink {
    fn send(&mut self, frame: Frame) -> Result<(), LinkError> {
        let lost = |reason: &str| LinkError::Lost {
            left: false,
            reason: reason.to_string(),
        };
        match &self.out {
            Some(tx) => tx
                .send(frame)
                .map_err(|_| lost("the stream to the right neighbour has closed")),
            None => Err(lost("this rank's links are closed")),
        }
    }

    fn recv(&mut self, timeout: Duration) -> Result<Frame, LinkError> {
        let incoming = &mut self.incoming;
        match self
            .handle
            .block_on(async { tokio::time::timeout(timeout, incoming.recv()).await })
        {
            Err(_) => Err(LinkError::Timeout),
            Ok(Some(r)) => r,
            Ok(None) => Err(LinkError::Lost {
                left: true,
                reason: "the stream from the left neighbour has closed".into(),
            }),
        }
    }

    fn abort(&mut self, reason: &str) {
        self.out = None;
        let reason: String = reason.chars().take(200).collect();
        for c in &self.conns {
            c.close(quinn::VarInt::from_u32(ABORT_CODE), reason.as_bytes());
        }
    }
}

impl Drop for QuicLink {
    fn drop(&mut self) {
        // Let queued frames drain: the writer finishes its stream once the
        // queue is empty, and the connections close when their last handle
        // (held by the writer and reader tasks) goes.
        self.out = None;
    }
}
