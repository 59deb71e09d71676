//! What the elected follower tells the others, on the table's `NOTIFY` channel, after it applied
//! a batch of the log to the shared tiers: the batch's changes and the two cursors it lies
//! between.
//!
//! A batch is sent as one or more notifications (a payload holds at most 8000 bytes) in one
//! short transaction that writes nothing, so they arrive together and in order:
//!
//! ```text
//! tc2 <sender, hex> <part>/<parts> <from snapshot> <to snapshot>
//! <txid> <version> <op> <flags> <written at, Unix ms> <key, escaped>
//! ...
//! ```
//!
//! `op` is `I`, `U`, `D` or `T` (a `TRUNCATE`: every key); `flags` is `-`, or `!` when the
//! sender could not apply the change to the shared tiers (every follower replays it there),
//! plus `L` when the key was too long to carry (the follower reads it from the log). A batch
//! whose cursors alone would not fit is sent as `tc2 <sender> gap`: every follower reads the
//! log itself.

use super::snapshot::{Snapshot, Xid};

/// The largest payload PostgreSQL takes, less a margin.
pub(crate) const MAX_PAYLOAD: usize = 7900;
/// Cursors longer than this (thousands of transactions in progress) are not sent.
const MAX_HEADER: usize = 4000;

/// One change of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) txid: Xid,
    pub(crate) version: u64,
    pub(crate) op: u8,
    /// The shared tiers could not take it.
    pub(crate) shared_missed: bool,
    /// When it was written (Unix milliseconds; 0: unknown).
    pub(crate) at_ms: u64,
    /// `None`: too long to carry; read it from the log.
    pub(crate) key: Option<String>,
}

impl Entry {
    /// When it was written, if known.
    pub(crate) fn committed_at(&self) -> Option<std::time::SystemTime> {
        (self.at_ms > 0).then(|| {
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(self.at_ms)
        })
    }
}

/// A notification, decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message {
    /// Part `part` (from 1) of `parts` of a batch between two cursors.
    Batch {
        sender: u64,
        part: u32,
        parts: u32,
        from: Snapshot,
        to: Snapshot,
        entries: Vec<Entry>,
    },
    /// A batch too large to describe: read the log.
    Gap { sender: u64 },
}

impl Message {
    pub(crate) fn sender(&self) -> u64 {
        match self {
            Message::Batch { sender, .. } | Message::Gap { sender } => *sender,
        }
    }
}

/// The payloads that carry `entries` between `from` and `to` (at least one, so that a batch
/// without entries still moves the others' cursors).
pub(crate) fn encode(
    sender: u64,
    from: &Snapshot,
    to: &Snapshot,
    entries: &[Entry],
) -> Vec<String> {
    let cursors = format!("{from} {to}");
    if cursors.len() > MAX_HEADER {
        return vec![format!("tc2 {sender:x} gap")];
    }
    let lines: Vec<String> = entries.iter().map(line).collect();
    // Fill payloads greedily; the part numbers are written once the count is known.
    let room = MAX_PAYLOAD - cursors.len() - 40;
    let mut groups: Vec<Vec<&str>> = vec![Vec::new()];
    let mut used = 0;
    for l in &lines {
        if used + l.len() + 1 > room && !groups.last().expect("one").is_empty() {
            groups.push(Vec::new());
            used = 0;
        }
        groups.last_mut().expect("one").push(l);
        used += l.len() + 1;
    }
    let parts = groups.len();
    groups
        .iter()
        .enumerate()
        .map(|(i, group)| {
            let mut text = format!("tc2 {sender:x} {}/{parts} {cursors}", i + 1);
            for l in group {
                text.push('\n');
                text.push_str(l);
            }
            text
        })
        .collect()
}

/// Whether a key travels in a message (a longer one is read back from the log by its
/// transaction and version).
pub(crate) fn fits(key: &str) -> bool {
    key.len() <= MAX_PAYLOAD / 2
}

fn line(entry: &Entry) -> String {
    let mut flags = String::new();
    if entry.shared_missed {
        flags.push('!');
    }
    let key = match &entry.key {
        Some(key) if fits(key) => escape(key),
        _ => {
            flags.push('L');
            String::new()
        }
    };
    if flags.is_empty() {
        flags.push('-');
    }
    format!(
        "{} {} {} {flags} {} {key}",
        entry.txid, entry.version, entry.op as char, entry.at_ms
    )
}

/// Decodes a notification; `None` for anything else on the channel.
pub(crate) fn decode(payload: &str) -> Option<Message> {
    let mut lines = payload.split('\n');
    let mut head = lines.next()?.split(' ');
    if head.next()? != "tc2" {
        return None;
    }
    let sender = u64::from_str_radix(head.next()?, 16).ok()?;
    let part = head.next()?;
    if part == "gap" {
        return Some(Message::Gap { sender });
    }
    let (part, parts) = part.split_once('/')?;
    let (part, parts): (u32, u32) = (part.parse().ok()?, parts.parse().ok()?);
    let from = Snapshot::parse(head.next()?)?;
    let to = Snapshot::parse(head.next()?)?;
    let mut entries = Vec::new();
    for l in lines {
        let mut fields = l.splitn(6, ' ');
        let txid = fields.next()?.parse().ok()?;
        let version = fields.next()?.parse().ok()?;
        let op = *fields.next()?.as_bytes().first()?;
        let flags = fields.next()?;
        let at_ms = fields.next()?.parse().ok()?;
        let key = fields.next()?;
        entries.push(Entry {
            txid,
            version,
            op,
            shared_missed: flags.contains('!'),
            at_ms,
            key: if flags.contains('L') {
                None
            } else {
                Some(unescape(key)?)
            },
        });
    }
    (part >= 1 && part <= parts).then_some(Message::Batch {
        sender,
        part,
        parts,
        from,
        to,
        entries,
    })
}

/// A key on one line: `%`, line breaks and NUL-free text escaped as `%XX`.
fn escape(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        match c {
            '%' | '\n' | '\r' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let hex = rest.get(at + 1..at + 3)?;
        out.push(char::from(u8::from_str_radix(hex, 16).ok()?));
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(txid: Xid, key: &str) -> Entry {
        Entry {
            txid,
            version: txid * 10,
            op: b'U',
            shared_missed: txid.is_multiple_of(2),
            at_ms: 1_700_000_000_000 + txid,
            key: Some(key.to_owned()),
        }
    }

    #[test]
    fn a_batch_round_trips_in_parts_that_fit_a_notification() {
        let from = Snapshot::parse("10:20:12,15").unwrap();
        let to = Snapshot::parse("12:40:12").unwrap();
        let entries: Vec<Entry> = (20..520)
            .map(|t| entry(t, &format!("user %{t}\nwith a space")))
            .collect();
        let payloads = encode(7, &from, &to, &entries);
        assert!(payloads.len() > 1);
        let mut back = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
            let Some(Message::Batch {
                sender,
                part,
                parts,
                from: f,
                to: t,
                entries,
            }) = decode(p)
            else {
                panic!("{p}")
            };
            assert_eq!(
                (sender, part, parts),
                (7, i as u32 + 1, payloads.len() as u32)
            );
            assert_eq!((&f, &t), (&from, &to));
            back.extend(entries);
        }
        assert_eq!(back, entries);
    }

    #[test]
    fn an_empty_batch_still_moves_the_cursor_and_a_long_key_is_read_from_the_log() {
        let from = Snapshot::parse("10:20:").unwrap();
        let to = Snapshot::parse("20:30:").unwrap();
        let payloads = encode(1, &from, &to, &[]);
        assert_eq!(payloads.len(), 1);
        assert!(
            matches!(decode(&payloads[0]), Some(Message::Batch { entries, .. }) if entries.is_empty())
        );
        let long = entry(21, &"k".repeat(6000));
        let Some(Message::Batch { entries, .. }) = decode(&encode(1, &from, &to, &[long])[0])
        else {
            panic!()
        };
        assert_eq!(entries[0].key, None);
    }

    #[test]
    fn cursors_too_long_to_send_are_a_gap_and_other_payloads_are_ignored() {
        let xip: Vec<String> = (100..2000).map(|x| x.to_string()).collect();
        let from = Snapshot::parse(&format!("100:5000:{}", xip.join(","))).unwrap();
        let payloads = encode(3, &from, &from, &[entry(1, "a")]);
        assert_eq!(decode(&payloads[0]), Some(Message::Gap { sender: 3 }));
        assert_eq!(decode("hello"), None);
        assert_eq!(decode("tc1 1 2 3"), None);
        assert_eq!(decode("tc2 1 3/2 1:2: 1:2:"), None);
    }
}
