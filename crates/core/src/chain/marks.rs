//! Marks: which keys this chain wrote or invalidated since a load began, and the newest version
//! it knows of each, so that no fill puts back what a change replaced.
//!
//! A load takes a ticket (the current mark number) when it starts. Every update, invalidation
//! (manual or another instance's) and clear marks what it changes with the next number, before
//! it touches a tier and again after, with the version it announces (an update's new version:
//! older copies are stale). A fill is refused when it is older than the newest version marked,
//! or when a mark without a version (a manual invalidation or a clear: anything read before it
//! is suspect) came after its ticket; it is checked before each set and once more after it (a
//! set that landed after the change is taken back). A fill at least as new as every version
//! marked is fine whenever its load began. The tiers' version rules and tombstones say the same, but the memory
//! tier's LRU may evict the tombstone or the newer entry that would have refused the old
//! version, and a key another instance changed is not held at all; marks live apart from any
//! tier, so eviction cannot lose them, and a change to a key not held costs no hot entry.
//!
//! The record is bounded: each of [`SHARDS`] shards keeps the last [`PER_SHARD`] marks. A mark
//! pushed out raises its shard's horizon, and a load whose ticket is older than the horizon is
//! refused for every key of the shard (it might have been marked): a back-fill skipped, never
//! an old version put back.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::entry::Version;
use crate::tier::Key;

/// Shards of the record (a power of two).
pub(super) const SHARDS: usize = 16;
/// Marks kept per shard.
pub(super) const PER_SHARD: usize = 256;

/// A load's place in the order of changes: marks numbered above it came after it began.
pub(super) type Ticket = u64;

pub(super) struct Marks<K> {
    /// The last mark number handed out.
    seq: AtomicU64,
    /// The number of the last clear: every load that began before it is refused.
    cleared: AtomicU64,
    shards: Box<[Mutex<Shard<K>>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// A key's last mark, its last mark without a version, and the newest version any of its
/// marks announced.
#[derive(Clone, Copy)]
struct Mark {
    at: u64,
    blind_at: u64,
    version: Version,
}

struct Shard<K> {
    /// Each marked key's last mark.
    last: HashMap<K, Mark>,
    /// Marks in the order made (a key marked again leaves its older entries here).
    order: VecDeque<(K, u64)>,
    /// The newest mark pushed out of `last`.
    horizon: u64,
}

impl<K: Key> Marks<K> {
    pub(super) fn new() -> Self {
        Marks {
            seq: AtomicU64::new(0),
            cleared: AtomicU64::new(0),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        last: HashMap::new(),
                        order: VecDeque::new(),
                        horizon: 0,
                    })
                })
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, Shard<K>> {
        let index = (self.hasher.hash_one(key) as usize) & (SHARDS - 1);
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A ticket for a load starting now.
    pub(super) fn ticket(&self) -> Ticket {
        self.seq.load(Ordering::SeqCst)
    }

    /// Marks `key` as changed now; `version`, if given, is the newest version of it (copies
    /// older than it are stale; `None`: whatever was read before is suspect). Returns the
    /// mark's number: a ticket that admits this change and refuses every later one made
    /// without a version.
    pub(super) fn mark(&self, key: &K, version: Option<Version>) -> Ticket {
        let mut shard = self.shard(key);
        // Numbered under the shard's lock, so that a shard's marks are in order.
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mark = shard.last.entry(key.clone()).or_insert(Mark {
            at: n,
            blind_at: 0,
            version: 0,
        });
        mark.at = n;
        match version {
            Some(version) => mark.version = mark.version.max(version),
            None => mark.blind_at = n,
        }
        shard.order.push_back((key.clone(), n));
        while shard.order.len() > PER_SHARD {
            let (old, at) = shard.order.pop_front().expect("longer than the bound");
            if shard.last.get(&old).is_some_and(|m| m.at == at) {
                shard.last.remove(&old);
                shard.horizon = at;
            }
        }
        n
    }

    /// Marks every key as changed now (a clear or a flush).
    pub(super) fn mark_all(&self) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.cleared.fetch_max(n, Ordering::SeqCst);
    }

    /// Forgets the versions of every mark (the source's history changed: its next versions may
    /// be below them), and refuses every load that began before.
    pub(super) fn forget_versions(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.last.clear();
            shard.order.clear();
        }
        self.mark_all();
    }

    /// The newest version a mark announced for `key` (0: none known). A copy older than it
    /// is stale, whatever tier holds it.
    pub(super) fn newest(&self, key: &K) -> Version {
        self.shard(key).last.get(key).map_or(0, |m| m.version)
    }

    /// Whether a fill holding `ticket` may still store `version` of `key`: no mark announced a
    /// newer version, and none without a version (a manual invalidation, a clear: whatever
    /// was read before it is suspect) came after the ticket.
    pub(super) fn admits(&self, key: &K, ticket: Ticket, version: Version) -> bool {
        self.check(key, ticket, version) == Verdict::Admit
    }

    /// [`admits`](Self::admits), saying why not.
    pub(super) fn check(&self, key: &K, ticket: Ticket, version: Version) -> Verdict {
        if self.cleared.load(Ordering::SeqCst) > ticket {
            return Verdict::Suspect;
        }
        let shard = self.shard(key);
        if shard.horizon > ticket {
            return Verdict::Suspect;
        }
        match shard.last.get(key) {
            Some(m) if m.blind_at > ticket => Verdict::Suspect,
            Some(m) if version < m.version => Verdict::Older,
            _ => Verdict::Admit,
        }
    }
}

/// What the marks say of a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Nothing changed that concerns it.
    Admit,
    /// A newer version was announced: a copy of this version or older is stale.
    Older,
    /// The key was invalidated (or everything cleared) since the load began: what it read is
    /// suspect, whatever its version.
    Suspect,
}

impl Verdict {
    /// What a fill that landed anyway must invalidate to take itself back: copies up to its
    /// own version (a newer one survives), or, when suspect, whatever is held (the same
    /// version may be re-read afterwards).
    pub(super) fn undo(self, version: Version) -> Option<Version> {
        match self {
            Verdict::Older => Some(version),
            Verdict::Admit | Verdict::Suspect => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_after_the_ticket_refuses_that_key_only() {
        let marks = Marks::<u32>::new();
        marks.mark(&1, None);
        let ticket = marks.ticket();
        assert!(marks.admits(&1, ticket, 1), "marked before the load began");
        marks.mark(&1, None);
        assert!(!marks.admits(&1, ticket, 1));
        assert!(marks.admits(&2, ticket, 1));
        assert!(marks.admits(&1, marks.ticket(), 1), "a later load is fine");
    }

    #[test]
    fn a_marked_version_refuses_older_fills_even_from_later_loads() {
        let marks = Marks::<u32>::new();
        let own = marks.mark(&1, Some(5));
        assert!(marks.admits(&1, own, 5), "the update's own sets");
        let later = marks.ticket();
        assert!(
            !marks.admits(&1, later, 4),
            "an older copy read after the mark"
        );
        assert!(marks.admits(&1, later, 6));
        marks.mark(&1, Some(3));
        marks.mark(&1, None);
        assert!(!marks.admits(&1, marks.ticket(), 4), "versions only go up");
        marks.mark(&1, Some(7));
        assert!(
            !marks.admits(&1, own, 5),
            "a newer change wins over the update's sets"
        );
    }

    #[test]
    fn a_refusal_says_how_to_take_a_fill_back() {
        let marks = Marks::<u32>::new();
        let ticket = marks.ticket();
        marks.mark(&1, Some(5));
        assert_eq!(marks.check(&1, ticket, 4), Verdict::Older);
        assert_eq!(Verdict::Older.undo(4), Some(4), "newer copies survive");
        marks.mark(&1, None);
        assert_eq!(marks.check(&1, ticket, 5), Verdict::Suspect);
        assert_eq!(Verdict::Suspect.undo(5), None);
    }

    #[test]
    fn a_clear_refuses_every_key() {
        let marks = Marks::<u32>::new();
        let ticket = marks.ticket();
        marks.mark_all();
        assert!(!marks.admits(&7, ticket, 1));
        assert!(marks.admits(&7, marks.ticket(), 1));
    }

    #[test]
    fn marks_pushed_out_of_the_record_refuse_older_loads_in_their_shard() {
        let marks = Marks::<u32>::new();
        let ticket = marks.ticket();
        marks.mark(&0, None);
        // Enough other keys to push key 0's mark out of every shard.
        for k in 1..=(SHARDS * PER_SHARD * 4) as u32 {
            marks.mark(&k, None);
        }
        assert!(
            !marks.admits(&0, ticket, 1),
            "still refused after its mark is gone"
        );
        let total: usize = marks
            .shards
            .iter()
            .map(|s| s.lock().unwrap().order.len())
            .sum();
        // Every shard saw about a thousand keys: each keeps exactly its bound.
        assert_eq!(total, SHARDS * PER_SHARD, "bounded, and no smaller");
        assert!(marks.admits(&0, marks.ticket(), 1));
    }

    #[test]
    fn a_key_marked_again_and_again_stays_bounded() {
        let marks = Marks::<u32>::new();
        for v in 0..10_000 {
            marks.mark(&1, Some(v));
        }
        assert!(marks.admits(&1, marks.ticket(), 9_999));
        assert!(!marks.admits(&1, marks.ticket(), 9_998));
        assert!(
            marks
                .shards
                .iter()
                .all(|s| s.lock().unwrap().order.len() <= PER_SHARD)
        );
    }
}
