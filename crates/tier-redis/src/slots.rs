//! Multi-key commands on a Redis Cluster, split by slot by the tier itself.
//!
//! The cluster client splits a multi-key command (`MGET`, `UNLINK`) across nodes on its own,
//! but only over the nodes it already holds a connection to: after a failover it leaves the
//! new master's keys out (redis-rs 1.8 skips a slot's node it has no connection for), so every
//! `MGET` fails with a count mismatch and every `UNLINK` silently leaves keys, until the tier is
//! rebuilt. One command per slot is routed like a single-key command instead: followed through
//! `MOVED`/`ASK` and the client's slot refresh, connecting to a node it has not used yet.

use std::collections::HashMap;

use futures_util::future::try_join_all;
use redis::Value;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;

/// The positions of `keys` grouped by slot, groups in order of first appearance.
fn by_slot(keys: &[String]) -> Vec<Vec<usize>> {
    let mut group_of: HashMap<Slot, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let group = *group_of.entry(Slot::for_key(key)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[group].push(i);
    }
    groups
}

/// Runs `command` once per slot over that slot's keys, all at once; the replies in the order
/// of the groups.
async fn per_slot<T: redis::FromRedisValue>(
    con: &ClusterConnection,
    command: &str,
    keys: &[String],
    groups: &[Vec<usize>],
) -> redis::RedisResult<Vec<T>> {
    try_join_all(groups.iter().map(|positions| {
        let mut con = con.clone();
        let mut cmd = redis::cmd(command);
        for &i in positions {
            cmd.arg(&keys[i]);
        }
        async move { cmd.query_async::<T>(&mut con).await }
    }))
    .await
}

/// `MGET keys`: the values in the order of `keys`.
pub(crate) async fn mget(
    con: &ClusterConnection,
    keys: &[String],
) -> redis::RedisResult<Vec<Value>> {
    let groups = by_slot(keys);
    let replies: Vec<Vec<Value>> = per_slot(con, "MGET", keys, &groups).await?;
    let mut values = vec![Value::Nil; keys.len()];
    for (positions, reply) in groups.iter().zip(replies) {
        if reply.len() != positions.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "MGET answered another number of values than it was given keys",
            )));
        }
        for (&i, value) in positions.iter().zip(reply) {
            values[i] = value;
        }
    }
    Ok(values)
}

/// `UNLINK keys`: how many were removed.
pub(crate) async fn unlink(con: &ClusterConnection, keys: &[String]) -> redis::RedisResult<i64> {
    let groups = by_slot(keys);
    let removed: Vec<i64> = per_slot(con, "UNLINK", keys, &groups).await?;
    Ok(removed.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_grouped_by_slot_in_order_of_first_appearance() {
        // `{a}x` and `{a}y` share a slot through their hash tag; `b` is elsewhere.
        let keys: Vec<String> = ["{a}x", "b", "{a}y", "b"].map(str::to_owned).to_vec();
        assert_eq!(by_slot(&keys), vec![vec![0, 2], vec![1, 3]]);
        assert!(by_slot(&[]).is_empty());
    }
}
