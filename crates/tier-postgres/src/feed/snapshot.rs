//! The feed's cursor: a PostgreSQL snapshot (`pg_snapshot`, `xmin:xmax:xip,...`).
//!
//! A change in the log is visible in a snapshot when its writing transaction had committed
//! when the snapshot was taken: its id is below `xmin`, or below `xmax` and not in the list of
//! transactions in progress (`xip`). A follower whose cursor is the snapshot `C` has applied
//! every change visible in `C`; what it still needs is exactly the changes *not* visible in
//! `C`: those of the transactions in `C.xip` and of those at or above `C.xmax`. Both are found
//! through the log's index on the transaction id, so a transaction held open anywhere in the
//! cluster (which keeps `xmin` back for an hour) costs a follower nothing: only its own id
//! stays in the list, and it has written nothing to the log (or, when it has, only its own
//! entries are read again, and applied once it commits).

use std::fmt;

/// A transaction id, epoch included (`xid8`): never wraps around.
pub(crate) type Xid = u64;

/// A parsed `pg_snapshot`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    xmin: Xid,
    xmax: Xid,
    /// Sorted.
    xip: Vec<Xid>,
}

impl Snapshot {
    /// Parses PostgreSQL's text form, `xmin:xmax:xip1,xip2,...`.
    pub(crate) fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin: Xid = parts.next()?.parse().ok()?;
        let xmax: Xid = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        let mut xip = Vec::new();
        if !list.is_empty() {
            for x in list.split(',') {
                xip.push(x.parse().ok()?);
            }
        }
        xip.sort_unstable();
        (xmin <= xmax && xip.iter().all(|&x| xmin <= x && x < xmax)).then_some(Snapshot {
            xmin,
            xmax,
            xip,
        })
    }

    /// The first transaction id not yet assigned when the snapshot was taken.
    pub(crate) fn xmax(&self) -> Xid {
        self.xmax
    }

    /// Whether transaction `xid` had ended (committed, if it wrote anything still in the log)
    /// when the snapshot was taken.
    pub(crate) fn sees(&self, xid: Xid) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// Whether everything visible in `other` is visible in `self` (`self` was taken at the same
    /// time or later): a follower at `self` needs nothing a follower at `other` had not
    /// applied.
    pub(crate) fn covers(&self, other: &Snapshot) -> bool {
        other.xmax <= self.xmax
            && self
                .xip
                .iter()
                .take_while(|&&x| x < other.xmax)
                .all(|x| other.xip.binary_search(x).is_ok())
    }
}

impl fmt::Display for Snapshot {
    /// PostgreSQL's text form (a `pg_snapshot` parameter).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Snapshot {
        Snapshot::parse(text).unwrap()
    }

    #[test]
    fn parses_and_prints_postgres_text_form() {
        assert_eq!(s("10:20:12,15").to_string(), "10:20:12,15");
        assert_eq!(s("10:10:").to_string(), "10:10:");
        assert_eq!(s("10:20:15,12").to_string(), "10:20:12,15", "sorted");
        for bad in ["", "1:2", "x:2:", "5:4:", "10:20:9", "10:20:20", "1:5:2,,3"] {
            assert!(Snapshot::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_transaction_is_visible_once_it_ended_before_the_snapshot() {
        let snap = s("10:20:12,15");
        assert!(snap.sees(3) && snap.sees(10) && snap.sees(11) && snap.sees(19));
        assert!(!snap.sees(12) && !snap.sees(15), "in progress");
        assert!(!snap.sees(20) && !snap.sees(99), "not started");
    }

    #[test]
    fn a_later_snapshot_covers_an_earlier_one_and_not_the_other_way() {
        let early = s("10:20:12,15");
        // 15 committed, 21 started and is running, 12 still runs.
        let late = s("12:25:12,21");
        assert!(late.covers(&early) && !early.covers(&late));
        assert!(early.covers(&early));
        // 12 ended in `late2` but is still running in... `early` needs nothing more.
        let late2 = s("21:25:21");
        assert!(late2.covers(&early) && late2.covers(&late));
        // Taken at about the same time by two sessions: neither sees the other's commit.
        let a = s("10:20:12");
        let b = s("10:20:15");
        assert!(!a.covers(&b) && !b.covers(&a));
    }

    #[test]
    fn an_open_transaction_stays_in_the_list_without_holding_the_cursor_back() {
        // Transaction 5 has been open for an hour; thousands of others committed since.
        let before = s("5:1000:5");
        let after = s("5:3000:5,2999");
        assert!(after.covers(&before));
        // What a follower at `after` still needs: 5's entries, 2999's, and what starts later.
        assert!(!after.sees(5) && !after.sees(2999) && !after.sees(3000));
        assert!(after.sees(1000) && after.sees(2998));
    }
}
