//! The rules, checked over the recorded history.

use super::*;

/// The checks of rules 1 to 6 over the whole history.
pub(crate) fn check(
    w: &World,
    records: &[Record],
    edits: &[Commit],
    case: Case,
) -> std::result::Result<(), TestCaseError> {
    let commits = w.db.commits.lock().unwrap().clone();
    let value_of = |k: u8, v: Version| commits.iter().find(|c| c.key == k && c.version == v);
    // Whether instance `inst` had nothing that could still fill a tier between `from` and
    // `until`: each of its operations began after `until`, or ended before `from` (and, with
    // background fills, long enough before it for them to have landed).
    let quiet = |inst: usize, from: u64, from_at: Instant, until: u64| {
        records.iter().all(|r| {
            r.inst != inst
                || r.start > until
                || (r.ended_before(from)
                    && (!case.background
                        || r.end.is_some_and(|(_, at)| at + FILL_SLACK <= from_at)))
        })
    };
    // A clear leaves no tombstones: the other instance's fills on their way may land in the
    // emptied tier until the clear's second pass (the longest cache-tier limit later). And
    // that second pass removes what an update or invalidation did meanwhile (a newer version,
    // a tombstone), so a fill that lands after it may put back an old version: the rules do
    // not hold for a read made while a clear settles, nor for a change made while one did.
    let clear_windows: Vec<(u64, Instant, Instant)> = records
        .iter()
        .filter(|c| matches!(c.step, Step::Clear(_)))
        .map(|c| {
            let settled = match c.end {
                Some((_, at)) => at + w.grace[c.inst] + TIER_LIMIT + Duration::from_millis(1),
                // A clear whose caller left runs on: its calls take at most a tier limit each.
                None => c.start_at + w.grace[c.inst] + 2 * MEMORY_LIMIT + 2 * TIER_LIMIT,
            };
            (c.start, c.start_at, settled)
        })
        .collect();
    let settling_clear = |r: &Record| {
        clear_windows
            .iter()
            .any(|&(start, _, settled)| start < r.start && r.start_at < settled)
    };
    let during_clear = |op: &Record| {
        let (_, end_at) = op.end.expect("a change that returned");
        clear_windows
            .iter()
            .any(|&(_, start_at, settled)| start_at <= end_at && op.start_at < settled)
    };
    // Whether read `r` of `key` could not have joined a load of its instance that began
    // before `seq` (another instance's change does not stop this instance's loads from being
    // joined; only a backplane message would).
    let no_older_load = |r: &Record, key: u8, seq: u64| {
        records.iter().all(|g| {
            !matches!(g.step, Step::Get(i, k) if i == r.inst && k == key)
                || g.start >= seq
                || match g.end {
                    Some((end, _)) => end < r.start,
                    None => g.start_at + LOAD_SPAN <= r.start_at,
                }
        })
    };
    // What the shared tier holds, looked at directly: the tier-level rules, with no reader in
    // between to blur them.
    let check_probe = |p: &Record,
                       k: u8,
                       held: Version|
     -> std::result::Result<(), TestCaseError> {
        for c in records.iter().filter(|c| c.ended_before(p.start)) {
            let (c_end, c_end_at) = c.end.unwrap();
            match (&c.step, c.outcomes.first()) {
                // Rule 2, in the tier: once an update returned, the tier holds that version,
                // newer, or nothing (the version rule and tombstones turn away older fills).
                (&Step::Update(_, uk), Some(&Outcome::Updated(v)))
                    if uk == k && !during_clear(c) && !c.shared_invalidation_faulty =>
                {
                    prop_assert!(
                        held >= v,
                        "step {}: the shared tier holds key {k}'s version {held} after step {}'s update on {} returned {v}",
                        p.index,
                        c.index,
                        NAMES[c.inst]
                    );
                }
                // Rule 3, in the tier: once an invalidation's own fills on their way have been
                // refused or taken back, and with the other instance quiet, the tier holds no
                // version older than the edit (a reader's copy goes up, never down).
                (&Step::Invalidate(_, ik), Some(Outcome::Done))
                    if ik == k
                        && !during_clear(c)
                        && !c.other_busy
                        && p.start_at >= c_end_at + OWN_SETTLE[c.inst] =>
                {
                    for e in edits.iter().filter(|e| {
                        e.key == k && e.seq < c.start && quiet(1 - c.inst, e.seq, e.at, c_end)
                    }) {
                        prop_assert!(
                            held >= e.version,
                            "step {}: the shared tier holds key {k}'s version {held} after step {}'s invalidation on {} of edit {}",
                            p.index,
                            c.index,
                            NAMES[c.inst],
                            e.version
                        );
                    }
                }
                _ => {}
            }
        }
        Ok(())
    };
    for r in records {
        let ctx = || format!("step {} {:?} on {}", r.index, r.step, NAMES[r.inst]);
        for o in &r.outcomes {
            match o {
                Outcome::Failed(e) => match r.step {
                    Step::Invalidate(..) | Step::Clear(_) => prop_assert!(
                        r.cache_faulty,
                        "{}: failed with no cache tier faulty: {e}",
                        ctx()
                    ),
                    _ => {
                        prop_assert!(r.source_faulty, "{}: failed with the source up: {e}", ctx());
                        if let (Some(value), false) = (&r.written, e.outcome_unknown()) {
                            // Its value is unique: it must not be in the source's history.
                            prop_assert!(
                                !commits.iter().any(|c| &c.value == value),
                                "{}: a write that failed ({e}) committed",
                                ctx()
                            );
                        }
                    }
                },
                Outcome::Updated(v) => {
                    let Step::Update(_, k) = r.step else {
                        unreachable!()
                    };
                    prop_assert!(
                        value_of(k, *v).map(|c| &c.value) == r.written.as_ref(),
                        "{}: version {v} is not the value written",
                        ctx()
                    );
                }
                Outcome::Read(..) | Outcome::Held(..) | Outcome::Done => {}
            }
        }
        if let (Step::Probe(k), Some(&Outcome::Held(Some(held)))) = (&r.step, r.outcomes.first()) {
            if !settling_clear(r) {
                check_probe(r, *k, held)?;
            }
            continue;
        }
        let Some((end, _)) = r.end else { continue };
        let settling = settling_clear(r);
        for o in &r.outcomes {
            let &Outcome::Read(k, got, stale) = o else {
                continue;
            };
            // Rule 1: a version the source committed before the read ended.
            if got > 0 {
                let c = value_of(k, got);
                prop_assert!(
                    c.is_some_and(|c| c.seq < end),
                    "{}: key {k} read version {got}, not committed before",
                    ctx()
                );
            }
            // Rule 2: updates.
            for u in records.iter().filter(|u| u.ended_before(r.start)) {
                let (Step::Update(_, uk), Some(Outcome::Updated(v))) =
                    (&u.step, u.outcomes.first())
                else {
                    continue;
                };
                if *uk != k {
                    continue;
                }
                let applies = !settling
                    && !during_clear(u)
                    && (u.inst == r.inst
                        || (r.inst == 1
                            && !u.shared_invalidation_faulty
                            && no_older_load(r, k, u.end.unwrap().0)));
                prop_assert!(
                    !applies || got >= *v,
                    "{}: key {k} read version {got} after step {}'s update on {} returned {v}",
                    ctx(),
                    u.index,
                    NAMES[u.inst]
                );
            }
            // Rule 3: invalidations after edits.
            for i in records.iter().filter(|i| i.ended_before(r.start)) {
                let Step::Invalidate(_, ik) = i.step else {
                    continue;
                };
                if ik != k {
                    continue;
                }
                let (i_end, i_end_at) = i.end.unwrap();
                let after_grace =
                    r.start_at >= i_end_at + w.grace[i.inst] + Duration::from_millis(3);
                for e in edits.iter().filter(|e| e.key == k && e.seq < i.start) {
                    // On the same instance: after the second pass, or at once if no fill
                    // that began before the invalidation was on its way (the other
                    // instance's are removed by the second pass; this instance's are taken
                    // back, but a reader may copy one up before).
                    let own = after_grace
                        || (!i.other_busy
                            && quiet(1 - i.inst, e.seq, e.at, i_end)
                            && quiet(i.inst, e.seq, e.at, i.start - 1));
                    let applies = !settling
                        && !during_clear(i)
                        && if i.inst == r.inst {
                            own
                        } else {
                            r.inst == 1
                                && after_grace
                                && no_older_load(r, k, i.start)
                                && matches!(i.outcomes.first(), Some(Outcome::Done))
                        };
                    prop_assert!(
                        !applies || got >= e.version,
                        "{}: key {k} read version {got} after step {}'s invalidation on {} of edit {} (grace passed: {after_grace})",
                        ctx(),
                        i.index,
                        NAMES[i.inst],
                        e.version
                    );
                }
            }
            // Rule 4: clears.
            for c in records
                .iter()
                .filter(|c| c.ended_before(r.start) && c.inst == r.inst)
            {
                if !matches!(
                    (&c.step, c.outcomes.first()),
                    (Step::Clear(_), Some(Outcome::Done))
                ) {
                    continue;
                }
                let (c_end, _) = c.end.unwrap();
                if c.other_busy
                    || !quiet(1 - c.inst, c.start, c.start_at, c_end)
                    || !quiet(c.inst, c.start, c.start_at, c.start - 1)
                {
                    continue;
                }
                let before = c.versions_before[usize::from(k)];
                prop_assert!(
                    got >= before,
                    "{}: key {k} read version {got} after step {}'s clear (source had {before})",
                    ctx(),
                    c.index
                );
            }
            // Rule 5: TTLs (stale copies and reads that cannot tell are exempt).
            if stale == Some(false) {
                for c in commits
                    .iter()
                    .filter(|c| c.key == k && c.at + MAX_TTL + FILL_SLACK <= r.start_at)
                {
                    prop_assert!(
                        got >= c.version,
                        "{}: key {k} fresh read of version {got}, {:?} after version {} was committed",
                        ctx(),
                        r.start_at - c.at,
                        c.version
                    );
                }
            }
        }
    }
    Ok(())
}
