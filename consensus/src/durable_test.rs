use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};

use super::Durability;
use crate::machine::Entry;

const ME: u64 = 1;

fn id(term: u64, node: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn entry(term: u64, node: u64, index: u64) -> Entry {
    Entry {
        log_id: id(term, node, index),
        payload: EntryPayload::Blank,
    }
}

fn leading(term: u64) -> Arc<Durability> {
    Durability::new(ME, Some(Vote::new_committed(term, ME)), Some(id(1, ME, 3)))
}

/// Resolves `wait(index)` or times out.
async fn waits(d: &Durability, index: u64) -> Option<Result<(), String>> {
    tokio::time::timeout(Duration::from_millis(50), d.wait(index))
        .await
        .ok()
}

/// A task waiting for `index`, checked to be still waiting.
async fn pending_wait(
    d: &Arc<Durability>,
    index: u64,
) -> tokio::task::JoinHandle<Result<(), String>> {
    let waiter = {
        let d = d.clone();
        tokio::spawn(async move { d.wait(index).await })
    };
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    waiter
}

#[test]
fn only_the_leaders_own_entries_under_its_committed_vote_are_deferred() {
    let d = leading(2);
    assert!(d.may_defer(&[entry(2, ME, 4), entry(2, ME, 5)]));
    // An entry of an earlier leadership of this node, resent by a later leader.
    assert!(!d.may_defer(&[entry(1, ME, 4)]));
    assert!(!d.may_defer(&[entry(2, ME, 4), entry(1, ME, 5)]));
    assert!(!d.may_defer(&[]));

    // A follower of node 2 appends node 2's entries synced.
    d.vote_saved(Vote::new_committed(3, 2));
    assert!(!d.may_defer(&[entry(3, 2, 4)]));
    assert!(!d.may_defer(&[entry(3, ME, 4)]));

    // A candidate has no entries of its own to defer.
    d.vote_saved(Vote::new(4, ME));
    assert!(!d.may_defer(&[entry(4, ME, 4)]));

    // With no vote saved, nothing is deferred.
    let fresh = Durability::new(ME, None, None);
    assert!(!fresh.may_defer(&[entry(0, 0, 0)]));
}

#[tokio::test]
async fn a_deferred_write_is_on_disk_only_after_its_sync_and_clamps_the_commit_index() {
    let d = leading(1);
    assert_eq!(d.durable(), Some(id(1, ME, 3)));
    let ticket = d
        .wrote(id(1, ME, 5), false)
        .expect("first deferred write starts a sync");
    // A second write while that sync is pending joins it rather than starting another.
    assert!(d.wrote(id(1, ME, 6), false).is_none());

    assert_eq!(d.durable(), Some(id(1, ME, 3)));
    assert_eq!(d.clamp(Some(id(1, ME, 6))), Some(id(1, ME, 3)));
    assert_eq!(d.clamp(Some(id(1, ME, 2))), Some(id(1, ME, 2)));
    assert_eq!(d.clamp(None), None);
    assert_eq!(waits(&d, 3).await, Some(Ok(())));
    assert_eq!(waits(&d, 5).await, None, "nothing synced yet");

    let syncs = AtomicUsize::new(0);
    d.run_syncs(ticket, || {
        syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    // One sync for index 5, then one more for the write that came in while it was pending.
    assert_eq!(syncs.load(Ordering::SeqCst), 2);
    assert_eq!(d.durable(), Some(id(1, ME, 6)));
    assert_eq!(d.clamp(Some(id(1, ME, 6))), Some(id(1, ME, 6)));
    assert_eq!(waits(&d, 6).await, Some(Ok(())));

    // Once the syncs stop, the next deferred write starts a new one.
    assert!(d.wrote(id(1, ME, 7), false).is_some());
}

#[tokio::test]
async fn a_waiter_wakes_when_the_background_sync_lands() {
    let d = leading(1);
    let ticket = d.wrote(id(1, ME, 4), false).expect("sync");
    let waiter = pending_wait(&d, 4).await;
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || d2.run_syncs(ticket, || Ok(())))
        .await
        .expect("sync ran");
    assert_eq!(waiter.await.expect("waiter"), Ok(()));
}

#[tokio::test]
async fn a_synced_write_covers_every_deferred_write_before_it() {
    let d = leading(1);
    let ticket = d.wrote(id(1, ME, 4), false).expect("sync");
    // Leadership lost; the new leader's entry is written synced, and with it entry 4.
    d.vote_saved(Vote::new_committed(2, 2));
    assert!(d.wrote(id(2, 2, 5), true).is_none());
    assert_eq!(d.durable(), Some(id(2, 2, 5)));
    assert_eq!(waits(&d, 5).await, Some(Ok(())));
    // The late background sync does not move the mark backwards.
    d.run_syncs(ticket, || Ok(()));
    assert_eq!(d.durable(), Some(id(2, 2, 5)));
}

#[test]
fn a_sync_that_straddles_a_truncation_does_not_count() {
    let d = leading(1);
    let ticket = d.wrote(id(1, ME, 6), false).expect("sync");
    // The sync is under way when the log is cut back to 4 (a synced write).
    let mut truncate = Some(|| d.truncated(Some(id(1, ME, 4))));
    d.run_syncs(ticket, || {
        if let Some(t) = truncate.take() {
            t();
        }
        Ok(())
    });
    assert_eq!(d.durable(), Some(id(1, ME, 4)));
}

#[tokio::test]
async fn a_failed_sync_fails_every_waiter() {
    let d = leading(1);
    let ticket = d.wrote(id(1, ME, 4), false).expect("sync");
    d.run_syncs(ticket, || Err("EIO".into()));
    let err = waits(&d, 4).await.expect("resolves").unwrap_err();
    assert!(err.contains("EIO"), "{err}");
    assert_eq!(d.durable(), Some(id(1, ME, 3)));
}

#[tokio::test]
async fn waiting_past_the_last_write_waits_only_for_that_write() {
    let d = leading(1);
    assert_eq!(waits(&d, 100).await, Some(Ok(())));
    let fresh = Durability::new(ME, None, None);
    assert_eq!(waits(&fresh, 7).await, Some(Ok(())));
}

#[test]
fn a_restarted_leader_does_not_resume_its_term() {
    let mine = Vote::new_committed(5, ME);
    let restarted = super::vote_after_restart(ME, mine);
    assert!(!restarted.is_committed());
    assert_eq!(restarted.leader_id(), mine.leader_id());
    // Anyone else's vote, and a vote not yet committed, come back as they were.
    let theirs = Vote::new_committed(5, 2);
    assert_eq!(super::vote_after_restart(ME, theirs), theirs);
    let campaign = Vote::new(6, ME);
    assert_eq!(super::vote_after_restart(ME, campaign), campaign);
}

#[tokio::test]
async fn a_held_back_commit_is_released_once_the_disk_catches_up() {
    let d = leading(1);
    let mut released = d.released();
    let ticket = d.wrote(id(1, ME, 5), false).expect("sync");
    // Not lowered: nothing to announce later.
    assert_eq!(d.clamp(Some(id(1, ME, 3))), Some(id(1, ME, 3)));
    assert!(!released.has_changed().expect("open"));
    // Lowered: announced once the sync lands.
    assert_eq!(d.clamp(Some(id(1, ME, 5))), Some(id(1, ME, 3)));
    assert!(!released.has_changed().expect("open"));
    d.run_syncs(ticket, || Ok(()));
    assert!(released.has_changed().expect("open"));
    released.mark_unchanged();
    // Nothing held back any more: a later sync announces nothing.
    let ticket = d.wrote(id(1, ME, 6), false).expect("sync");
    d.run_syncs(ticket, || Ok(()));
    assert!(!released.has_changed().expect("open"));
}

#[tokio::test]
async fn a_waiter_for_entries_a_truncation_removed_is_let_go() {
    let d = leading(1);
    let _ticket = d.wrote(id(1, ME, 10), false).expect("sync");
    let waiter = pending_wait(&d, 10).await;
    // A later leader cuts the log back to 8 (synced): nothing up to 10 is left to wait for.
    d.truncated(Some(id(1, ME, 8)));
    let done = tokio::time::timeout(Duration::from_secs(5), waiter).await;
    assert_eq!(done.expect("the waiter is let go").expect("joined"), Ok(()));
}
