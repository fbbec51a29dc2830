//! The scheduler's bounded view of one type's waiting tasks.
//!
//! A view holds at most `capacity` of the oldest unowned tasks of its type, ordered by
//! `(posted_time, id)`. It is filled by database polls (which read the oldest `capacity` rows
//! through the partial index) and by local adds; `maybe_more` says whether the database may
//! hold waiting tasks beyond it. The view is a hint: the claim statement is the authority, so
//! a stale entry only costs a claim that gets fewer rows than asked.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use harmonydb::Timestamp;

use crate::model::{Candidate, RetryWait, TaskId};

/// The waiting tasks of one type known to this node.
///
/// Each entry carries the poll epoch current when it was learned, so that a poll's result can
/// be merged without losing what arrived while the poll ran: entries learned before the poll
/// started and missing from its result are gone (claimed elsewhere or finished); entries
/// learned after it started are kept.
#[derive(Debug)]
pub(crate) struct TypeView {
    by_order: BTreeMap<(Timestamp, TaskId), (Candidate, u64)>,
    posted_of: HashMap<TaskId, Timestamp>,
    capacity: usize,
    /// The database may hold waiting tasks of this type that are not in the view.
    pub maybe_more: bool,
}

impl TypeView {
    pub(crate) fn new(capacity: usize) -> Self {
        TypeView {
            by_order: BTreeMap::new(),
            posted_of: HashMap::new(),
            capacity: capacity.max(1),
            maybe_more: false,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_order.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_order.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, id: TaskId) -> bool {
        self.posted_of.contains_key(&id)
    }

    /// Oldest posted time in the view.
    pub(crate) fn oldest(&self) -> Option<Timestamp> {
        self.by_order.keys().next().map(|(t, _)| *t)
    }

    /// Adds (or updates) a candidate learned at poll epoch `epoch`. When the view is full, the
    /// newest entry is dropped and `maybe_more` set: the database still has it.
    pub(crate) fn insert(&mut self, c: Candidate, epoch: u64) {
        self.remove(c.id);
        let key = (c.posted, c.id);
        if self.by_order.len() >= self.capacity {
            let newest = *self
                .by_order
                .keys()
                .next_back()
                .expect("full view is not empty");
            self.maybe_more = true;
            if key > newest {
                return;
            }
            self.remove(newest.1);
        }
        self.posted_of.insert(c.id, c.posted);
        self.by_order.insert(key, (c, epoch));
    }

    pub(crate) fn remove(&mut self, id: TaskId) -> Option<Candidate> {
        let posted = self.posted_of.remove(&id)?;
        self.by_order.remove(&(posted, id)).map(|(c, _)| c)
    }

    /// The candidate record of `id`.
    pub(crate) fn get(&self, id: TaskId) -> Option<&Candidate> {
        let posted = self.posted_of.get(&id)?;
        self.by_order.get(&(*posted, id)).map(|(c, _)| c)
    }

    /// Merges the result of a poll started at `epoch`. `complete` means the poll returned
    /// fewer rows than it asked for, so nothing waits beyond them. `skip` filters out tasks
    /// this node claimed or runs (a poll that raced a claim still lists them).
    pub(crate) fn merge_poll(
        &mut self,
        epoch: u64,
        polled: Vec<Candidate>,
        complete: bool,
        skip: impl Fn(TaskId) -> bool,
    ) {
        let seen: std::collections::HashSet<TaskId> = polled.iter().map(|c| c.id).collect();
        let stale: Vec<TaskId> = self
            .by_order
            .values()
            .filter(|(c, e)| *e < epoch && !seen.contains(&c.id))
            .map(|(c, _)| c.id)
            .collect();
        for id in stale {
            self.remove(id);
        }
        self.maybe_more = false;
        for c in polled {
            if skip(c.id) {
                continue;
            }
            // A poll is a snapshot from when it read; the view may have learned something
            // newer since (a release recorded after the read, with its retries and update
            // time). Keeping the older snapshot would offer a failed task before its retry
            // wait is over.
            if self
                .get(c.id)
                .is_some_and(|known| (known.updated, known.retries) > (c.updated, c.retries))
            {
                continue;
            }
            self.insert(c, epoch);
        }
        if !complete {
            self.maybe_more = true;
        }
    }

    /// Whether a task is past its retry wait at `now`.
    pub(crate) fn eligible_at(c: &Candidate, retry: &RetryWait) -> Timestamp {
        if c.retries == 0 {
            return c.updated;
        }
        c.updated + retry.wait(c.retries)
    }

    /// Up to `limit` ids that may start at `now`, oldest first, and the earliest time a task
    /// still in its retry wait becomes eligible.
    pub(crate) fn eligible(
        &self,
        now: Timestamp,
        retry: &RetryWait,
        limit: usize,
    ) -> (Vec<TaskId>, Option<Timestamp>) {
        let mut ids = Vec::with_capacity(limit.min(self.by_order.len()));
        let mut next: Option<Timestamp> = None;
        for (c, _) in self.by_order.values() {
            let at = Self::eligible_at(c, retry);
            if at <= now {
                if ids.len() < limit {
                    ids.push(c.id);
                }
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            if ids.len() >= limit && next.is_some() {
                break;
            }
        }
        (ids, next)
    }
}

/// Time until `at` from `now`, zero when past.
pub(crate) fn until(now: Timestamp, at: Timestamp) -> Duration {
    at.since(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: i64, posted: i64) -> Candidate {
        Candidate {
            id: TaskId(id),
            posted: Timestamp::from_millis(posted),
            updated: Timestamp::from_millis(posted),
            retries: 0,
        }
    }

    #[test]
    fn fifo_by_posted_then_id() {
        let mut v = TypeView::new(10);
        v.insert(cand(3, 100), 0);
        v.insert(cand(1, 200), 0);
        v.insert(cand(2, 100), 0);
        let (ids, next) = v.eligible(Timestamp::from_millis(1000), &RetryWait::Immediate, 10);
        assert_eq!(ids, vec![TaskId(2), TaskId(3), TaskId(1)]);
        assert_eq!(next, None);
        assert_eq!(v.oldest(), Some(Timestamp::from_millis(100)));
    }

    /// A poll that read a task before its failure was recorded must not replace what the
    /// release told the view (found by `engine::retries_wait_then_succeed` under load: the
    /// retry started 4 ms after the failure instead of after its 300 ms wait).
    #[test]
    fn a_stale_poll_does_not_undo_a_release() {
        let mut v = TypeView::new(10);
        let released = Candidate {
            updated: Timestamp::from_millis(500),
            retries: 1,
            ..cand(1, 100)
        };
        v.insert(released.clone(), 2);
        v.merge_poll(1, vec![cand(1, 100)], true, |_| false);
        assert_eq!(v.get(TaskId(1)), Some(&released));
        let wait = RetryWait::constant(std::time::Duration::from_millis(300));
        let (ids, next) = v.eligible(Timestamp::from_millis(600), &wait, 10);
        assert!(ids.is_empty(), "offered during its retry wait");
        assert_eq!(next, Some(Timestamp::from_millis(800)));
    }

    #[test]
    fn bounded_keeps_oldest_and_remembers_more() {
        let mut v = TypeView::new(2);
        v.insert(cand(1, 10), 0);
        v.insert(cand(2, 20), 0);
        assert!(!v.maybe_more);
        v.insert(cand(3, 30), 0);
        assert!(v.maybe_more);
        assert!(!v.contains(TaskId(3)));
        v.insert(cand(4, 5), 0);
        assert!(v.contains(TaskId(4)) && v.contains(TaskId(1)) && !v.contains(TaskId(2)));
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn retry_wait_is_honoured() {
        let mut v = TypeView::new(10);
        let mut c = cand(1, 0);
        c.retries = 2;
        c.updated = Timestamp::from_millis(1_000);
        v.insert(c, 0);
        v.insert(cand(2, 500), 0);
        let wait = RetryWait::constant(Duration::from_secs(5));
        let (ids, next) = v.eligible(Timestamp::from_millis(2_000), &wait, 10);
        assert_eq!(ids, vec![TaskId(2)]);
        assert_eq!(next, Some(Timestamp::from_millis(6_000)));
        let (ids, next) = v.eligible(Timestamp::from_millis(6_000), &wait, 10);
        assert_eq!(ids, vec![TaskId(1), TaskId(2)]);
        assert_eq!(next, None);
    }

    #[test]
    fn poll_merge_keeps_what_arrived_during_the_poll() {
        let mut v = TypeView::new(10);
        v.insert(cand(9, 1), 0); // known before the poll, gone from the database
        v.insert(cand(5, 1), 0); // known before, still there
        // Poll starts at epoch 1; meanwhile a local add arrives.
        v.insert(cand(7, 3), 1);
        v.merge_poll(1, vec![cand(5, 1), cand(2, 2), cand(3, 2)], true, |id| {
            id == TaskId(3)
        });
        assert!(!v.contains(TaskId(9)), "stale entry dropped");
        assert!(v.contains(TaskId(5)) && v.contains(TaskId(2)));
        assert!(!v.contains(TaskId(3)), "claimed locally, skipped");
        assert!(v.contains(TaskId(7)), "added during the poll, kept");
        assert!(!v.maybe_more);
        v.merge_poll(2, vec![cand(1, 1)], false, |_| false);
        assert!(v.maybe_more);
    }
}
