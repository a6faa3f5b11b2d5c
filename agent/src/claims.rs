//! Path claims: while a path is being received, it belongs to the connection
//! that claimed it, and every other sender that asks for it is told to wait.
//!
//! This is what makes "each path crosses the wire once" true across
//! connections and masters: the first `QueryMissing` that finds a path
//! missing claims it for its connection; the others see it in flight and wait
//! on it instead of sending it again.
//!
//! A claim goes through these states, which its waiters see:
//!
//! ```text
//! Pending ──submitted()──▶ Submitted ──complete()──▶ Completed (entry removed)
//!    └──────────────┴──── drop / abandon() ─────────▶ Abandoned (entry removed)
//! ```
//!
//! `Submitted` means the NAR was restored, its hash and size checked, its
//! own references are valid or queued, and its registration is in the
//! batcher's queue (set only after the enqueue, never before): a path that
//! refers to it may be queued too (the batcher serves its queue in order,
//! one call at a time, references first within a call), so uploads of
//! dependent paths do not wait for registration round trips
//! ([`Waiter::submitted`]). Senders that want the path *valid* wait
//! for the end ([`Waiter::settled`]). After an abandon, waiters ask again
//! and one of them becomes the new owner.
//!
//! The table is a `std::sync::Mutex` around a map: it is never held across an
//! `.await` (every method is synchronous), so a blocking mutex is both correct
//! and cheaper than an async one. Waiting happens on a `watch` channel per
//! claim, outside the lock, made only once somebody waits.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// Where a claim stands, as its waiters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    /// Claimed; its NAR has not been checked yet.
    Pending,
    /// Restored, checked, and submitted for registration.
    Submitted,
    /// Registered: the path is valid now.
    Completed,
    /// The owner gave up: ask again, and send the path yourself if it is
    /// still missing.
    Abandoned,
}

/// Identifies the holder of a claim (the agent uses connection ids).
pub type OwnerId = u64;

/// What a sender asking for a path must do.
#[derive(Debug)]
pub enum ClaimReply<K: Eq + Hash + Clone> {
    /// The path is now claimed by the asker: send it.
    Send(Claim<K>),
    /// Someone holds it already (possibly the asker itself, under another
    /// [`Claim`]): wait on the [`Waiter`].
    Wait { owner: OwnerId, waiter: Waiter },
}

/// A sender's hold on a path it is sending. Dropping it without
/// [`Claim::complete`] abandons the claim.
#[derive(Debug)]
pub struct Claim<K: Eq + Hash + Clone> {
    table: ClaimTable<K>,
    key: K,
    id: u64,
    owner: OwnerId,
    done: bool,
}

/// Waits for another sender's claim to progress.
#[derive(Debug, Clone)]
pub struct Waiter {
    rx: watch::Receiver<ClaimState>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    owner: OwnerId,
    state: ClaimState,
    /// Made when the first waiter subscribes: most claims (a 100,000-path
    /// QueryMissing) are never waited for, and a channel costs a few
    /// hundred bytes.
    tx: Option<watch::Sender<ClaimState>>,
}

impl Entry {
    fn waiter(&mut self) -> Waiter {
        let state = self.state;
        let tx = self.tx.get_or_insert_with(|| watch::channel(state).0);
        Waiter { rx: tx.subscribe() }
    }

    fn publish(&mut self, state: ClaimState) {
        self.state = state;
        if let Some(tx) = &self.tx {
            tx.send_replace(state);
        }
    }
}

#[derive(Debug)]
struct Inner<K> {
    claims: HashMap<K, Entry>,
    next_id: u64,
}

/// The agent-wide table of paths being received.
#[derive(Debug)]
pub struct ClaimTable<K> {
    inner: Arc<Mutex<Inner<K>>>,
}

impl<K> Clone for ClaimTable<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Eq + Hash + Clone> Default for ClaimTable<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone> ClaimTable<K> {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                claims: HashMap::new(),
                next_id: 0,
            })),
        }
    }

    /// Claim `key` for `owner`, or learn whom to wait for.
    pub fn claim(&self, key: &K, owner: OwnerId) -> ClaimReply<K> {
        let mut inner = self.lock();
        if let Some(entry) = inner.claims.get_mut(key) {
            return ClaimReply::Wait {
                owner: entry.owner,
                waiter: entry.waiter(),
            };
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.claims.insert(
            key.clone(),
            Entry {
                id,
                owner,
                state: ClaimState::Pending,
                tx: None,
            },
        );
        ClaimReply::Send(Claim {
            table: self.clone(),
            key: key.clone(),
            id,
            owner,
            done: false,
        })
    }

    /// Claim `key` for `owner`, or learn who holds it, without a
    /// [`Waiter`] (which would make the claim's channel): for askers that
    /// only report "in flight".
    pub fn try_claim(&self, key: &K, owner: OwnerId) -> Result<Claim<K>, OwnerId> {
        if let Some(entry) = self.lock().claims.get(key) {
            return Err(entry.owner);
        }
        match self.claim(key, owner) {
            ClaimReply::Send(claim) => Ok(claim),
            // Claimed in between the two locks.
            ClaimReply::Wait { owner, .. } => Err(owner),
        }
    }

    /// Who holds `key`, if anybody (no [`Waiter`]).
    pub fn owner(&self, key: &K) -> Option<OwnerId> {
        self.lock().claims.get(key).map(|entry| entry.owner)
    }

    /// Who holds `key`, and a waiter on it; `None` if nobody does.
    pub fn holder(&self, key: &K) -> Option<(OwnerId, Waiter)> {
        self.lock()
            .claims
            .get_mut(key)
            .map(|entry| (entry.owner, entry.waiter()))
    }

    /// Whether `key` is claimed by someone right now.
    pub fn is_claimed(&self, key: &K) -> bool {
        self.lock().claims.contains_key(key)
    }

    /// Number of claims held right now.
    pub fn len(&self) -> usize {
        self.lock().claims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set(&self, key: &K, id: u64, state: ClaimState) {
        let mut inner = self.lock();
        // Only the claim's own owner may change it: after an abandon a new
        // owner may hold the same key under a new id.
        if inner.claims.get(key).is_none_or(|e| e.id != id) {
            return;
        }
        match state {
            ClaimState::Completed | ClaimState::Abandoned => {
                if let Some(mut entry) = inner.claims.remove(key) {
                    entry.publish(state);
                }
            }
            ClaimState::Pending | ClaimState::Submitted => {
                if let Some(entry) = inner.claims.get_mut(key) {
                    entry.publish(state);
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        // A panic while holding this lock leaves the map consistent (every
        // method makes one insert, update or remove), so a poisoned lock is
        // usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<K: Eq + Hash + Clone> Claim<K> {
    pub fn key(&self) -> &K {
        &self.key
    }

    pub fn owner(&self) -> OwnerId {
        self.owner
    }

    /// The path is restored, checked and submitted for registration: wake
    /// the waiters that only need it to be on its way.
    pub fn submitted(&self) {
        self.table.set(&self.key, self.id, ClaimState::Submitted);
    }

    /// The path is registered: wake the waiters with
    /// [`ClaimState::Completed`].
    pub fn complete(mut self) {
        self.done = true;
        self.table.set(&self.key, self.id, ClaimState::Completed);
    }

    /// Give the path up explicitly (dropping does the same).
    pub fn abandon(self) {}
}

impl<K: Eq + Hash + Clone> Drop for Claim<K> {
    fn drop(&mut self) {
        if !self.done {
            self.table.set(&self.key, self.id, ClaimState::Abandoned);
        }
    }
}

impl Waiter {
    /// Waits until the claim ends: [`ClaimState::Completed`] or
    /// [`ClaimState::Abandoned`]. A claim whose entry vanished without a word
    /// (cannot happen through this API) counts as abandoned.
    pub async fn settled(mut self) -> ClaimState {
        match self
            .rx
            .wait_for(|s| matches!(s, ClaimState::Completed | ClaimState::Abandoned))
            .await
        {
            Ok(state) => *state,
            Err(_) => ClaimState::Abandoned,
        }
    }

    /// Waits until the path is at least submitted for registration: `true`
    /// once [`ClaimState::Submitted`] or [`ClaimState::Completed`], `false`
    /// if the claim was abandoned first.
    pub async fn submitted(mut self) -> bool {
        match self
            .rx
            .wait_for(|s| *s != ClaimState::Pending)
            .await
            .map(|s| *s)
        {
            Ok(ClaimState::Submitted | ClaimState::Completed) => true,
            Ok(ClaimState::Pending | ClaimState::Abandoned) | Err(_) => false,
        }
    }

    /// The state right now.
    pub fn state(&self) -> ClaimState {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(reply: ClaimReply<&'static str>) -> Claim<&'static str> {
        match reply {
            ClaimReply::Send(claim) => claim,
            ClaimReply::Wait { .. } => panic!("expected Send"),
        }
    }

    fn wait(reply: ClaimReply<&'static str>) -> (OwnerId, Waiter) {
        match reply {
            ClaimReply::Wait { owner, waiter } => (owner, waiter),
            ClaimReply::Send(_) => panic!("expected Wait"),
        }
    }

    #[tokio::test]
    async fn second_sender_waits_for_completion() {
        let table = ClaimTable::new();
        let claim = send(table.claim(&"p", 1));
        let (owner, waiter) = wait(table.claim(&"p", 2));
        assert_eq!(owner, 1);
        assert!(table.is_claimed(&"p"));
        claim.complete();
        assert_eq!(waiter.settled().await, ClaimState::Completed);
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn dropped_claim_is_abandoned_and_can_be_reclaimed() {
        let table = ClaimTable::new();
        let claim = send(table.claim(&"p", 1));
        let (_, waiter) = wait(table.claim(&"p", 2));
        drop(claim);
        assert_eq!(waiter.settled().await, ClaimState::Abandoned);
        let again = send(table.claim(&"p", 2));
        assert_eq!(again.owner(), 2);
        again.complete();
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn stale_owner_cannot_end_a_new_claim() {
        let table = ClaimTable::new();
        let first = send(table.claim(&"p", 1));
        let first_id = first.id;
        drop(first);
        let second = send(table.claim(&"p", 1));
        // Ending or advancing under the first id must not touch the second.
        table.set(&"p", first_id, ClaimState::Completed);
        table.set(&"p", first_id, ClaimState::Submitted);
        assert!(table.is_claimed(&"p"));
        assert_eq!(
            table.holder(&"p").expect("held").1.state(),
            ClaimState::Pending
        );
        second.complete();
    }

    #[tokio::test]
    async fn submitted_wakes_reference_waiters_but_not_settled_waiters() {
        let table = ClaimTable::new();
        let claim = send(table.claim(&"dep", 1));
        let (_, for_ref) = table.holder(&"dep").expect("held");
        let (_, for_valid) = table.holder(&"dep").expect("held");
        let settled = tokio::spawn(for_valid.settled());
        claim.submitted();
        assert!(for_ref.clone().submitted().await);
        assert_eq!(for_ref.state(), ClaimState::Submitted);
        tokio::task::yield_now().await;
        assert!(!settled.is_finished(), "submitted is not settled");
        claim.complete();
        assert_eq!(settled.await.expect("task"), ClaimState::Completed);
        // A waiter that subscribes late still sees the end.
        assert!(for_ref.submitted().await);
    }

    #[tokio::test]
    async fn abandon_after_submit_fails_reference_waiters() {
        let table = ClaimTable::new();
        let claim = send(table.claim(&"dep", 1));
        let (_, waiter) = table.holder(&"dep").expect("held");
        let pending = tokio::spawn(waiter.clone().submitted());
        drop(claim);
        assert!(!pending.await.expect("task"));
        assert_eq!(waiter.settled().await, ClaimState::Abandoned);

        // Submitted, then the registration fails: the claim is dropped.
        let claim = send(table.claim(&"dep", 1));
        let (_, waiter) = table.holder(&"dep").expect("held");
        claim.submitted();
        drop(claim);
        assert_eq!(waiter.settled().await, ClaimState::Abandoned);
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn try_claim_makes_no_channel_until_someone_waits() {
        let table = ClaimTable::new();
        let claim = table.try_claim(&"p", 1).expect("free");
        assert_eq!(table.try_claim(&"p", 2).err(), Some(1));
        assert_eq!(table.owner(&"p"), Some(1));
        assert!(table.lock().claims[&"p"].tx.is_none());
        claim.submitted();
        // A late waiter starts from the state reached so far.
        let (_, waiter) = table.holder(&"p").expect("held");
        assert_eq!(waiter.state(), ClaimState::Submitted);
        claim.complete();
        assert_eq!(waiter.settled().await, ClaimState::Completed);
        assert_eq!(table.owner(&"p"), None);
    }

    #[tokio::test]
    async fn four_senders_one_owner() {
        // Four senders race for ten overlapping paths: exactly one owner per
        // path, the others wait and see it completed.
        let table = ClaimTable::new();
        let keys: Vec<&'static str> = vec!["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        let mut owners = Vec::new();
        let mut waiters = Vec::new();
        for sender in 0..4 {
            for key in &keys {
                match table.claim(key, sender) {
                    ClaimReply::Send(claim) => owners.push(claim),
                    ClaimReply::Wait { owner, waiter } => {
                        assert_eq!(owner, 0);
                        waiters.push(waiter);
                    }
                }
            }
        }
        assert_eq!(owners.len(), keys.len());
        assert_eq!(waiters.len(), 3 * keys.len());
        for claim in owners {
            claim.complete();
        }
        for waiter in waiters {
            assert_eq!(waiter.settled().await, ClaimState::Completed);
        }
    }
}
