//! A gRPC client of the coordinator group that finds the raft leader: it
//! tries the coordinators in turn, follows `hcx-leader` hints, and retries
//! while an election is under way.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::proto::cluster_client::ClusterClient;

/// Metadata key a follower sets to the leader's address.
pub const LEADER_HEADER: &str = "hcx-leader";

/// Why a call failed after every retry.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No coordinator address was given.
    #[error("no coordinator addresses given (use --coordinators or HCX_COORDINATORS)")]
    NoCoordinators,
    /// An address could not be used.
    #[error("coordinator address {addr:?}: {why}")]
    BadAddress {
        /// The address.
        addr: String,
        /// Why.
        why: String,
    },
    /// The coordinators refused the request (bad input, unknown job…).
    #[error("{}", .0.message())]
    Refused(Status),
    /// No coordinator answered within the retry budget.
    #[error("no coordinator reachable or no leader elected after {tries} tries: {last}")]
    Unavailable {
        /// Attempts made.
        tries: u32,
        /// The last error seen.
        last: String,
    },
}

/// Talks to whichever coordinator leads.
#[derive(Clone)]
pub struct CoordinatorClient {
    addrs: Vec<String>,
    tls: Option<ClientTlsConfig>,
    current: Arc<Mutex<Option<(String, Channel)>>>,
    /// Total time to keep retrying a call before giving up.
    pub patience: Duration,
}

/// The leader hint a follower put on an error, if any.
pub fn leader_hint(status: &Status) -> Option<String> {
    status
        .metadata()
        .get(LEADER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A lazily connecting channel to `addr`, over TLS when given.
pub fn channel(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel, ClientError> {
    let bad = |why: String| ClientError::BadAddress {
        addr: addr.to_string(),
        why,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        ep = ep.tls_config(tls.clone()).map_err(|e| bad(e.to_string()))?;
    }
    Ok(ep.connect_lazy())
}

impl CoordinatorClient {
    /// A client of the coordinators at `addrs` (`host:port`), over TLS when given.
    pub fn new(addrs: Vec<String>, tls: Option<ClientTlsConfig>) -> Result<Self, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoCoordinators);
        }
        for a in &addrs {
            channel(a, tls.as_ref())?;
        }
        Ok(CoordinatorClient {
            addrs,
            tls,
            current: Arc::new(Mutex::new(None)),
            patience: Duration::from_secs(30),
        })
    }

    fn pick(&self, attempt: usize) -> Result<(String, Channel), ClientError> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cur.as_ref() {
            return Ok(c.clone());
        }
        let addr = self.addrs[attempt % self.addrs.len()].clone();
        let ch = channel(&addr, self.tls.as_ref())?;
        *cur = Some((addr.clone(), ch.clone()));
        Ok((addr, ch))
    }

    fn switch(&self, to: Option<String>) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *cur = match to {
            Some(addr) => channel(&addr, self.tls.as_ref()).ok().map(|c| (addr, c)),
            None => None,
        };
    }

    /// The address of the coordinator the last call went to.
    pub fn current_addr(&self) -> Option<String> {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        cur.as_ref().map(|c| c.0.clone())
    }

    /// Runs `f` against the leader, retrying on another coordinator when one
    /// is unreachable or not the leader, until `patience` runs out.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.patience;
        let mut attempt = 0usize;
        let mut last: String;
        loop {
            let (addr, ch) = self.pick(attempt)?;
            match f(ClusterClient::new(ch)).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => match s.code() {
                    Code::FailedPrecondition if leader_hint(&s).is_some() => {
                        last = format!("{addr}: {}", s.message());
                        self.switch(leader_hint(&s));
                    }
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown => {
                        last = format!("{addr}: {}", s.message());
                        self.switch(None);
                        attempt += 1;
                    }
                    Code::FailedPrecondition if s.message().contains("no leader") => {
                        last = format!("{addr}: {}", s.message());
                        self.switch(None);
                        attempt += 1;
                    }
                    _ => return Err(ClientError::Refused(s)),
                },
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Unavailable {
                    tries: attempt as u32 + 1,
                    last,
                });
            }
            let pause = if attempt.is_multiple_of(self.addrs.len()) {
                200
            } else {
                20
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
}
