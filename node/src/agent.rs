//! The node's decisions, without I/O: when to register, when to
//! heartbeat, which shards to start, abort or start again. [`Agent::step`]
//! takes what happened ([`Event`]) and returns what to do ([`Action`]); the
//! async shell in `lib.rs` carries the actions out and feeds the outcomes
//! back. Time is an input, so the unit tests below drive every path without
//! sockets or clocks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hcx_net::proto::Assignment;

/// A shard attempt: job, shard index, attempt number.
pub type WorkKey = (String, u32, u32);

/// The key of an assignment.
pub fn key_of(a: &Assignment) -> WorkKey {
    (a.job_id.clone(), a.shard, a.attempt)
}

/// What happened, as the shell saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// The heartbeat period passed (or the agent just started).
    Tick,
    /// The coordinators accepted the registration.
    Registered,
    /// Registration failed (no leader yet, network); try again next tick.
    RegisterFailed,
    /// A heartbeat's reply: the shards the leader has this node working on.
    Assignments(Vec<Assignment>),
    /// The leader does not know this node (a new leader, a restored
    /// snapshot): register again.
    Unknown,
    /// A heartbeat failed for another reason; try again next tick.
    HeartbeatFailed,
    /// The work on a shard attempt ended (reported or failed).
    WorkEnded(WorkKey),
    /// The node is stopping.
    Stop,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send the registration.
    Register,
    /// Send a heartbeat.
    Heartbeat,
    /// Start work on this shard attempt.
    Start(Assignment),
    /// Stop the work on this shard attempt (taken back, or stopping).
    Abort(WorkKey),
}

/// A shard attempt the agent started, and when its work ended (if it has).
#[derive(Debug, Clone, Copy)]
struct Work {
    ended: Option<Instant>,
}

/// The agent's state: whether it is registered and the work it started.
#[derive(Debug)]
pub struct Agent {
    registered: bool,
    stopped: bool,
    retry_after: Duration,
    work: BTreeMap<WorkKey, Work>,
}

impl Agent {
    /// A new, unregistered agent. A shard whose work ended but which the
    /// leader still lists after `retry_after` (its report did not get
    /// through) is started again.
    pub fn new(retry_after: Duration) -> Agent {
        Agent {
            registered: false,
            stopped: false,
            retry_after,
            work: BTreeMap::new(),
        }
    }

    /// Whether the coordinators accepted this node.
    pub fn registered(&self) -> bool {
        self.registered
    }

    /// The shard attempts started and not yet dropped.
    pub fn working_on(&self) -> impl Iterator<Item = &WorkKey> {
        self.work.keys()
    }

    /// Takes one event at time `now` and returns the actions it calls for.
    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Action> {
        if self.stopped {
            return Vec::new();
        }
        match event {
            Event::Tick => {
                if self.registered {
                    vec![Action::Heartbeat]
                } else {
                    vec![Action::Register]
                }
            }
            Event::Registered => {
                self.registered = true;
                vec![Action::Heartbeat]
            }
            Event::RegisterFailed | Event::HeartbeatFailed => Vec::new(),
            Event::Unknown => {
                self.registered = false;
                Vec::new()
            }
            Event::Assignments(list) => self.reconcile(now, list),
            Event::WorkEnded(k) => {
                if let Some(w) = self.work.get_mut(&k) {
                    w.ended.get_or_insert(now);
                }
                Vec::new()
            }
            Event::Stop => {
                self.stopped = true;
                std::mem::take(&mut self.work)
                    .into_keys()
                    .map(Action::Abort)
                    .collect()
            }
        }
    }

    /// Brings the started work in line with the leader's list.
    fn reconcile(&mut self, now: Instant, list: Vec<Assignment>) -> Vec<Action> {
        let wanted: BTreeMap<WorkKey, Assignment> =
            list.into_iter().map(|a| (key_of(&a), a)).collect();
        let mut actions = Vec::new();
        let retry_after = self.retry_after;
        self.work.retain(|k, w| {
            if !wanted.contains_key(k) {
                // Taken back (lease, cancel) or done: stop any work left.
                actions.push(Action::Abort(k.clone()));
                return false;
            }
            // Ended long ago but still ours: its report was lost; run it again.
            w.ended
                .is_none_or(|t| now.saturating_duration_since(t) <= retry_after)
        });
        for (k, a) in wanted {
            if self.work.contains_key(&k) {
                continue;
            }
            self.work.insert(k, Work { ended: None });
            actions.push(Action::Start(a));
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(job: &str, shard: u32, attempt: u32) -> Assignment {
        Assignment {
            job_id: job.into(),
            shard,
            attempt,
            ..Default::default()
        }
    }

    fn started(actions: &[Action]) -> Vec<WorkKey> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start(a) => Some(key_of(a)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn registers_until_accepted_then_heartbeats() {
        let t = Instant::now();
        let mut a = Agent::new(Duration::from_secs(5));
        assert_eq!(a.step(t, Event::Tick), vec![Action::Register]);
        assert!(a.step(t, Event::RegisterFailed).is_empty());
        assert_eq!(a.step(t, Event::Tick), vec![Action::Register]);
        assert_eq!(a.step(t, Event::Registered), vec![Action::Heartbeat]);
        assert!(a.registered());
        assert_eq!(a.step(t, Event::Tick), vec![Action::Heartbeat]);
        assert!(a.step(t, Event::HeartbeatFailed).is_empty());
        assert_eq!(a.step(t, Event::Tick), vec![Action::Heartbeat]);
        // A leader that does not know this node: register again.
        assert!(a.step(t, Event::Unknown).is_empty());
        assert_eq!(a.step(t, Event::Tick), vec![Action::Register]);
    }

    #[test]
    fn starts_each_listed_shard_once_and_aborts_what_is_taken_back() {
        let t = Instant::now();
        let mut a = Agent::new(Duration::from_secs(5));
        a.step(t, Event::Registered);
        let first = a.step(
            t,
            Event::Assignments(vec![shard("j", 0, 1), shard("j", 1, 1)]),
        );
        assert_eq!(
            started(&first),
            vec![("j".into(), 0, 1), ("j".into(), 1, 1)]
        );
        // Listed again while running: nothing new.
        assert!(
            a.step(
                t,
                Event::Assignments(vec![shard("j", 0, 1), shard("j", 1, 1)])
            )
            .is_empty()
        );
        // Shard 1 taken back (its lease went to another node as attempt 2).
        let next = a.step(t, Event::Assignments(vec![shard("j", 0, 1)]));
        assert_eq!(next, vec![Action::Abort(("j".into(), 1, 1))]);
        assert_eq!(a.working_on().count(), 1);
        // A new attempt of the same shard is new work.
        let again = a.step(
            t,
            Event::Assignments(vec![shard("j", 0, 1), shard("j", 1, 3)]),
        );
        assert_eq!(started(&again), vec![("j".into(), 1, 3)]);
    }

    #[test]
    fn work_whose_report_was_lost_starts_again_after_the_retry_delay() {
        let t = Instant::now();
        let retry = Duration::from_secs(5);
        let mut a = Agent::new(retry);
        a.step(t, Event::Registered);
        let list = vec![shard("j", 0, 1)];
        a.step(t, Event::Assignments(list.clone()));
        a.step(t, Event::WorkEnded(("j".into(), 0, 1)));
        // Still listed soon after: the report may be in flight.
        assert!(
            a.step(t + retry / 2, Event::Assignments(list.clone()))
                .is_empty()
        );
        // Still listed long after: run it again.
        let again = a.step(t + retry * 2, Event::Assignments(list.clone()));
        assert_eq!(started(&again), vec![("j".into(), 0, 1)]);
        // An attempt no longer listed is dropped (aborting work that has
        // ended is harmless) and not started again.
        a.step(t + retry * 2, Event::WorkEnded(("j".into(), 0, 1)));
        let gone = a.step(t + retry * 3, Event::Assignments(Vec::new()));
        assert_eq!(gone, vec![Action::Abort(("j".into(), 0, 1))]);
        assert_eq!(a.working_on().count(), 0);
    }

    #[test]
    fn stopping_aborts_everything_and_ignores_what_follows() {
        let t = Instant::now();
        let mut a = Agent::new(Duration::from_secs(5));
        a.step(t, Event::Registered);
        a.step(
            t,
            Event::Assignments(vec![shard("j", 0, 1), shard("k", 2, 1)]),
        );
        let stop = a.step(t, Event::Stop);
        assert_eq!(
            stop,
            vec![
                Action::Abort(("j".into(), 0, 1)),
                Action::Abort(("k".into(), 2, 1))
            ]
        );
        assert!(a.step(t, Event::Tick).is_empty());
        assert!(
            a.step(t, Event::Assignments(vec![shard("j", 0, 1)]))
                .is_empty()
        );
    }

    #[test]
    fn a_work_end_for_unknown_work_changes_nothing() {
        let t = Instant::now();
        let mut a = Agent::new(Duration::from_secs(5));
        a.step(t, Event::Registered);
        assert!(a.step(t, Event::WorkEnded(("x".into(), 9, 9))).is_empty());
        assert_eq!(a.working_on().count(), 0);
    }
}
