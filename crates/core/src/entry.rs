//! Versioned entries, tombstones and the rules that keep an older version from coming back.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Timestamp;

/// The source's version of a key: starts at 1 with the first write and grows by one with every
/// write. Version 0 means "never written" (the version of a cached "not found").
pub type Version = u64;

/// A cached value (or a cached "not found") with the source version it came from and the time it
/// stops being fresh.
///
/// Values are shared, never cloned: a hit hands out another [`Arc`] to the same value.
/// `Debug` never prints the value (it may be a user's configuration).
pub struct Entry<V> {
    /// The value; `None` caches the source's "not found" (negative caching).
    pub value: Option<Arc<V>>,
    /// The source's version of this value.
    pub version: Version,
    /// When the entry stops being fresh; `None` for entries that do not expire (the source's).
    pub expires_at: Option<Timestamp>,
}

impl<V> Entry<V> {
    /// A value at `version` that does not expire (yet: each tier caps it with its own TTL).
    #[must_use]
    pub fn new(value: Arc<V>, version: Version) -> Self {
        Entry {
            value: Some(value),
            version,
            expires_at: None,
        }
    }

    /// A cached "not found" at `version` (0 for a key never written).
    #[must_use]
    pub fn absent(version: Version) -> Self {
        Entry {
            value: None,
            version,
            expires_at: None,
        }
    }

    /// The same entry, expiring at `at`.
    #[must_use]
    pub fn expiring_at(mut self, at: Timestamp) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Whether this entry caches a "not found".
    #[must_use]
    pub fn is_absent(&self) -> bool {
        self.value.is_none()
    }

    /// Whether the entry is past its expiry at `now`.
    #[inline]
    #[must_use]
    pub fn is_expired(&self, now: Timestamp) -> bool {
        matches!(self.expires_at, Some(at) if now >= at)
    }

    /// Time left until expiry at `now`; `None` if the entry does not expire.
    #[must_use]
    pub fn remaining(&self, now: Timestamp) -> Option<Duration> {
        self.expires_at.map(|at| at.saturating_since(now))
    }

    /// The expiry a tier with time-to-live `ttl` gives this entry when it stores it at `now`:
    /// the earlier of `now + ttl` and the entry's own expiry.
    #[must_use]
    pub fn capped_expiry(&self, now: Timestamp, ttl: Duration) -> Timestamp {
        let own = now + ttl;
        match self.expires_at {
            Some(at) if at < own => at,
            _ => own,
        }
    }
}

impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Entry {
            value: self.value.clone(),
            version: self.version,
            expires_at: self.expires_at,
        }
    }
}

impl<V> fmt::Debug for Entry<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("present", &self.value.is_some())
            .field("version", &self.version)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What a cache tier holds for one key: a live entry, or a tombstone left by an invalidation.
///
/// The version rules live here so that every in-process tier applies them the same way (the
/// Redis tier applies the same rules in its Lua script):
///
/// * a set of version `v` is refused if the slot holds a newer entry, or an unexpired tombstone
///   at a version `>= v` ([`Slot::admits`]);
/// * an invalidation at version `v` removes entries at versions `<= v` and leaves a tombstone
///   at `v`; a newer entry survives it ([`Slot::invalidated`]).
pub enum Slot<V> {
    /// A value (possibly expired: an expired entry still refuses older versions, and may serve
    /// as a fail-safe stale copy).
    Live(Entry<V>),
    /// An invalidation at `version`, refusing sets of versions `<= version` until `until`.
    Tombstone {
        /// The invalidated version.
        version: Version,
        /// When the tombstone stops refusing sets.
        until: Timestamp,
    },
}

impl<V> Slot<V> {
    /// Whether a set of an entry at `version` may replace this slot at `now`.
    #[inline]
    #[must_use]
    pub fn admits(&self, version: Version, now: Timestamp) -> bool {
        match self {
            Slot::Live(entry) => version >= entry.version,
            Slot::Tombstone {
                version: dead,
                until,
            } => version > *dead || now >= *until,
        }
    }

    /// The fresh entry this slot serves at `now`, if any.
    #[inline]
    #[must_use]
    pub fn fresh(&self, now: Timestamp) -> Option<&Entry<V>> {
        match self {
            Slot::Live(entry) if !entry.is_expired(now) => Some(entry),
            _ => None,
        }
    }

    /// The slot after an invalidation at `version` at `now`, with tombstones living
    /// `tombstone_ttl`; `None` means "remove the slot".
    ///
    /// `Some(v)` removes an entry at a version `<= v` and leaves a tombstone at `v` (or keeps a
    /// live tombstone's higher version); a newer entry survives.
    ///
    /// `None` (a manual invalidation, which knows no version) removes the entry held and leaves
    /// a tombstone just below its version: older versions (a slow, older update's repopulation,
    /// say) cannot come back, but the same version can be re-read from the source. Live
    /// tombstones stay.
    #[must_use]
    pub fn invalidated(
        this: Option<Self>,
        version: Option<Version>,
        now: Timestamp,
        tombstone_ttl: Duration,
    ) -> Option<Self> {
        let until = now + tombstone_ttl;
        match (this, version) {
            // A newer entry survives an invalidation of older versions.
            (Some(Slot::Live(entry)), Some(v)) if entry.version > v => Some(Slot::Live(entry)),
            (Some(Slot::Live(_)), Some(v)) | (None, Some(v)) => {
                Some(Slot::Tombstone { version: v, until })
            }
            (Some(Slot::Live(entry)), None) => {
                entry.version.checked_sub(1).map(|below| Slot::Tombstone {
                    version: below,
                    until,
                })
            }
            (
                Some(Slot::Tombstone {
                    version: dead,
                    until: old,
                }),
                v,
            ) if now < old => Some(Slot::Tombstone {
                version: v.map_or(dead, |v| v.max(dead)),
                until: if v.is_some() { until } else { old },
            }),
            (Some(Slot::Tombstone { .. }), Some(v)) => Some(Slot::Tombstone { version: v, until }),
            (Some(Slot::Tombstone { .. }), None) | (None, None) => None,
        }
    }

    /// The version this slot refuses to go below at `now`, if any.
    #[must_use]
    pub fn floor(&self, now: Timestamp) -> Option<Version> {
        match self {
            Slot::Live(entry) => Some(entry.version),
            Slot::Tombstone { version, until } if now < *until => Some(*version),
            Slot::Tombstone { .. } => None,
        }
    }
}

impl<V> fmt::Debug for Slot<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Live(entry) => f.debug_tuple("Live").field(entry).finish(),
            Slot::Tombstone { version, until } => f
                .debug_struct("Tombstone")
                .field("version", version)
                .field("until", until)
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_duration(Duration::from_secs(secs))
    }

    fn live(version: Version) -> Slot<u32> {
        Slot::Live(Entry::new(Arc::new(7), version))
    }

    #[test]
    fn debug_shows_the_version_and_never_the_value() {
        let printed = format!("{:?}", Entry::new(Arc::new("s3cret-value"), 3));
        assert!(printed.contains("version: 3"), "{printed}");
        assert!(printed.contains("present: true"), "{printed}");
        assert!(!printed.contains("s3cret"), "{printed}");
    }

    #[test]
    fn a_slot_debug_shows_versions_and_never_the_value() {
        let printed = format!("{:?}", Slot::Live(Entry::new(Arc::new("s3cret-value"), 4)));
        assert!(
            printed.contains("Live") && printed.contains("version: 4"),
            "{printed}"
        );
        assert!(!printed.contains("s3cret"), "{printed}");
        let tombstone = Slot::<u32>::Tombstone {
            version: 2,
            until: t(9),
        };
        let printed = format!("{tombstone:?}");
        assert!(
            printed.contains("Tombstone") && printed.contains("version: 2"),
            "{printed}"
        );
    }

    #[test]
    fn a_not_found_entry_is_absent_and_a_value_is_not() {
        assert!(Entry::<u32>::absent(0).is_absent());
        assert!(!Entry::new(Arc::new(1), 1).is_absent());
    }

    #[test]
    fn live_entry_refuses_older_versions_even_when_expired() {
        let slot = Slot::Live(Entry::new(Arc::new(1), 5).expiring_at(t(10)));
        assert!(!slot.admits(4, t(100)));
        assert!(slot.admits(5, t(100)));
        assert!(slot.admits(6, t(0)));
        assert!(slot.fresh(t(9)).is_some());
        assert!(slot.fresh(t(10)).is_none());
    }

    #[test]
    fn tombstone_refuses_versions_up_to_its_own_until_it_dies() {
        let slot: Slot<u32> = Slot::Tombstone {
            version: 5,
            until: t(60),
        };
        assert!(!slot.admits(5, t(0)));
        assert!(!slot.admits(3, t(59)));
        assert!(slot.admits(6, t(0)));
        assert!(slot.admits(3, t(60)));
        assert!(slot.fresh(t(0)).is_none());
        assert_eq!(slot.floor(t(59)), Some(5));
        assert_eq!(slot.floor(t(60)), None, "dead at its until");
        assert_eq!(live(7).floor(t(1_000)), Some(7));
        // An invalidation at a lower version keeps the live tombstone's version, and replaces
        // one that died: at exactly its `until`, it is dead.
        let ttl = Duration::from_secs(60);
        let five = || Slot::<u32>::Tombstone {
            version: 5,
            until: t(60),
        };
        let alive = Slot::invalidated(Some(five()), Some(3), t(59), ttl);
        assert!(matches!(alive, Some(Slot::Tombstone { version: 5, .. })));
        let replaced = Slot::invalidated(Some(five()), Some(3), t(60), ttl);
        assert!(matches!(replaced, Some(Slot::Tombstone { version: 3, .. })));
    }

    #[test]
    fn invalidation_keeps_newer_entries() {
        let ttl = Duration::from_secs(60);
        let kept = Slot::invalidated(Some(live(9)), Some(5), t(0), ttl);
        assert!(matches!(kept, Some(Slot::Live(e)) if e.version == 9));
        let dead = Slot::invalidated(Some(live(5)), Some(5), t(0), ttl);
        assert!(matches!(dead, Some(Slot::Tombstone { version: 5, .. })));
        // A manual invalidation refuses older versions, not the one it removed.
        let manual = Slot::invalidated(Some(live(4)), None, t(0), ttl).unwrap();
        assert!(matches!(manual, Slot::Tombstone { version: 3, .. }));
        assert!(manual.admits(4, t(0)) && !manual.admits(3, t(0)));
        assert!(Slot::invalidated(Some(live(0)), None, t(0), ttl).is_none());
        assert!(Slot::<u32>::invalidated(None, None, t(0), ttl).is_none());
        let fresh = Slot::<u32>::invalidated(None, Some(2), t(0), ttl);
        assert!(matches!(fresh, Some(Slot::Tombstone { version: 2, .. })));
    }

    #[test]
    fn invalidation_of_a_tombstone_keeps_the_higher_live_version() {
        let ttl = Duration::from_secs(60);
        let stone: Slot<u32> = Slot::Tombstone {
            version: 8,
            until: t(30),
        };
        let raised = Slot::invalidated(Some(stone), Some(3), t(10), ttl);
        assert!(matches!(raised, Some(Slot::Tombstone { version: 8, .. })));
        let dead: Slot<u32> = Slot::Tombstone {
            version: 8,
            until: t(30),
        };
        let replaced = Slot::invalidated(Some(dead), Some(3), t(40), ttl);
        assert!(matches!(replaced, Some(Slot::Tombstone { version: 3, .. })));
        let live_stone: Slot<u32> = Slot::Tombstone {
            version: 8,
            until: t(30),
        };
        let kept = Slot::invalidated(Some(live_stone), None, t(10), ttl);
        assert!(matches!(kept, Some(Slot::Tombstone { version: 8, until }) if until == t(30)));
    }

    #[test]
    fn capped_expiry_takes_the_earlier() {
        let e = Entry::new(Arc::new(1), 1).expiring_at(t(100));
        assert_eq!(e.capped_expiry(t(0), Duration::from_secs(300)), t(100));
        assert_eq!(e.capped_expiry(t(0), Duration::from_secs(30)), t(30));
        let forever = Entry::new(Arc::new(1), 1);
        assert_eq!(forever.capped_expiry(t(5), Duration::from_secs(30)), t(35));
        assert_eq!(forever.remaining(t(5)), None);
        assert_eq!(e.remaining(t(40)), Some(Duration::from_secs(60)));
    }

    #[test]
    fn debug_never_prints_the_value() {
        let e = Entry::new(Arc::new("secret-config-value"), 3);
        let printed = format!("{e:?} {:?}", Slot::Live(e.clone()));
        assert!(!printed.contains("secret-config-value"), "{printed}");
    }

    proptest! {
        /// After any sequence of sets and invalidations applied by the rules, the slot's floor
        /// never goes down while tombstones live, and no refused version is ever stored.
        #[test]
        fn floor_never_decreases(ops in proptest::collection::vec((any::<bool>(), 0u64..20), 1..60)) {
            let ttl = Duration::from_secs(1_000);
            let now = t(1);
            let mut slot: Option<Slot<u32>> = None;
            let mut floor = 0u64;
            for (is_set, version) in ops {
                if is_set {
                    let admitted = slot.as_ref().is_none_or(|s| s.admits(version, now));
                    if admitted {
                        prop_assert!(version >= floor || slot.is_none());
                        slot = Some(live(version));
                    }
                } else {
                    slot = Slot::invalidated(slot, Some(version), now, ttl);
                }
                if let Some(f) = slot.as_ref().and_then(|s| s.floor(now)) {
                    prop_assert!(f >= floor, "floor went from {} to {}", floor, f);
                    floor = f;
                }
            }
        }
    }
}
