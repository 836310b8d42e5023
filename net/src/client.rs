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

/// Largest message of the cluster API, each way, on both ends (32 MiB): a
/// job file and a status listing of many jobs with their shards fit; a
/// larger one is refused before it is buffered. The raft service has its
/// own limit (coordinator/src/network.rs).
pub const API_MESSAGE_LIMIT: usize = 32 * 1024 * 1024;

/// How long a call keeps retrying by default.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(30);

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
    #[error(
        "no coordinator reachable or no leader elected within {} s ({tries} tries); last: {last}",
        .waited.as_secs()
    )]
    Unavailable {
        /// Attempts made.
        tries: u32,
        /// How long the call kept trying.
        waited: Duration,
        /// The last error seen, with the coordinator's address.
        last: String,
    },
}

/// What a call still waiting for a coordinator reports (see
/// [`CoordinatorClient::on_wait`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The coordinator tried last.
    pub addr: String,
    /// Why it did not answer (`connection refused`, `no leader yet`, …).
    pub reason: String,
    /// Time left before the call gives up.
    pub left: Duration,
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "waiting for a coordinator at {} ({}); giving up in {} s",
            self.addr,
            self.reason,
            self.left.as_secs_f64().ceil() as u64
        )
    }
}

/// A call still failing after this long reports what it waits for, then
/// again every [`WAIT_REPEAT`].
pub const WAIT_NOTICE: Duration = Duration::from_secs(2);
/// See [`WAIT_NOTICE`].
pub const WAIT_REPEAT: Duration = Duration::from_secs(10);

type WaitHook = Arc<dyn Fn(&Waiting) + Send + Sync>;

/// Talks to whichever coordinator leads.
#[derive(Clone)]
pub struct CoordinatorClient {
    addrs: Vec<String>,
    tls: Option<ClientTlsConfig>,
    current: Arc<Mutex<Option<(String, Channel)>>>,
    /// Total time to keep retrying a call before giving up.
    pub patience: Duration,
    on_wait: Option<WaitHook>,
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
            patience: DEFAULT_PATIENCE,
            on_wait: None,
        })
    }

    /// Gives up a call after `patience` instead of [`DEFAULT_PATIENCE`].
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Calls `hook` when a call has failed for [`WAIT_NOTICE`] and keeps
    /// retrying (then every [`WAIT_REPEAT`]), so a user is told what it waits
    /// for instead of facing silence.
    pub fn on_wait(mut self, hook: impl Fn(&Waiting) + Send + Sync + 'static) -> Self {
        self.on_wait = Some(Arc::new(hook));
        self
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
    /// is unreachable or not the leader, until `patience` runs out (an
    /// attempt still pending then is abandoned).
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = tokio::time::Instant::now();
        let deadline = start + self.patience;
        let mut next_notice = start + WAIT_NOTICE;
        let mut attempt = 0usize;
        let mut tries = 0u32;
        // The last reason an attempt gave, for when the final one is cut
        // short by the deadline.
        let mut earlier: Option<String> = None;
        loop {
            let (addr, ch) = self.pick(attempt)?;
            tries += 1;
            let reason = match tokio::time::timeout_at(
                deadline,
                f(ClusterClient::new(ch)
                    .max_decoding_message_size(API_MESSAGE_LIMIT)
                    .max_encoding_message_size(API_MESSAGE_LIMIT)),
            )
            .await
            {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => match s.code() {
                    Code::FailedPrecondition if leader_hint(&s).is_some() => {
                        self.switch(leader_hint(&s));
                        s.message().to_string()
                    }
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown => {
                        self.switch(None);
                        attempt += 1;
                        why(&s)
                    }
                    Code::FailedPrecondition if s.message().contains("no leader") => {
                        self.switch(None);
                        attempt += 1;
                        s.message().to_string()
                    }
                    _ => return Err(ClientError::Refused(s)),
                },
                Err(_) => {
                    self.switch(None);
                    attempt += 1;
                    match &earlier {
                        Some(e) => format!("no answer; before that: {e}"),
                        None => "no answer".to_string(),
                    }
                }
            };
            earlier = Some(reason.clone());
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ClientError::Unavailable {
                    tries,
                    waited: now - start,
                    last: format!("{addr}: {reason}"),
                });
            }
            if now >= next_notice {
                if let Some(hook) = &self.on_wait {
                    hook(&Waiting {
                        addr,
                        reason,
                        left: deadline - now,
                    });
                }
                next_notice = now + WAIT_REPEAT;
            }
            let pause = if attempt.is_multiple_of(self.addrs.len()) {
                200
            } else {
                20
            };
            tokio::time::sleep_until((now + Duration::from_millis(pause)).min(deadline)).await;
        }
    }
}

/// A short reason for a failed call: the OS error of a failed connection
/// (`connection refused`, `timed out`) when there is one, else the status message.
fn why(s: &Status) -> String {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    let mut found = None;
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            found = Some(match io.get_ref() {
                // A failed TLS handshake: rustls' error says what is wrong
                // with the certificate (such as the host it does not name).
                Some(inner) if io.kind() == std::io::ErrorKind::InvalidData => inner.to_string(),
                _ => io.kind().to_string(),
            });
        }
        src = e.source();
    }
    found.unwrap_or_else(|| {
        let m = s.message();
        if m.is_empty() {
            format!("{:?}", s.code())
        } else {
            m.to_string()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ListJobsRequest;

    #[tokio::test]
    async fn an_absent_coordinator_is_reported_then_given_up() {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        let client = CoordinatorClient::new(vec!["127.0.0.1:1".into()], None)
            .unwrap()
            .with_patience(Duration::from_millis(2500))
            .on_wait(move |w| log.lock().unwrap().push(w.to_string()));
        let t0 = std::time::Instant::now();
        let err = client
            .call(|mut c| async move { c.list_jobs(ListJobsRequest {}).await })
            .await
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let err = err.to_string();
        assert!(
            err.contains("within 2 s") && err.contains("127.0.0.1:1"),
            "{err}"
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with(
                "waiting for a coordinator at 127.0.0.1:1 (connection refused); giving up in "
            ),
            "{seen:?}"
        );
    }
}
