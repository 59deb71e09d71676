//! Cluster administration: removing this tier's keys from every master, and finding them.

use redis::Value as RedisValue;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tiercache_core::{Result, StorageKey};

use crate::keys::{self, decode_key};
use crate::link::Conn;
#[cfg(feature = "cluster")]
use crate::slots;
use crate::tier::RedisTier;

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> RedisTier<K, V> {
    /// Removes this tier's keys from one server (`node`: a cluster master's address).
    pub(crate) async fn clear_node(&self, node: Option<(String, u16)>) -> Result<()> {
        let pattern = format!("{}*", keys::glob_escape(&self.config.prefix));
        let prefix_len = self.config.prefix.len();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500);
            let node = node.clone();
            let (next, found): (u64, Vec<String>) = self
                .run(|con| async move {
                    let value = send_to(con, scan, node).await?;
                    redis::from_redis_value(value).map_err(Into::into)
                })
                .await?;
            // Only keys this tier wrote: the prefix, then an encoded key (which has no ':').
            let ours: Vec<String> = found
                .into_iter()
                .filter(|k| {
                    k.get(prefix_len..)
                        .is_some_and(|rest| decode_key(rest).is_some())
                })
                .collect();
            if !ours.is_empty() {
                let _: i64 = self
                    .run(|mut con| async move {
                        #[cfg(feature = "cluster")]
                        if let Conn::Cluster(cluster) = &con {
                            return slots::unlink(cluster, &ours).await;
                        }
                        redis::cmd("UNLINK").arg(ours).query_async(&mut con).await
                    })
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// The cluster's masters, from `CLUSTER SLOTS`.
    #[cfg(feature = "cluster")]
    pub(crate) async fn cluster_masters(&self) -> Result<Vec<(String, u16)>> {
        let slots: Vec<RedisValue> = self
            .run(|mut con| async move {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut con)
                    .await
            })
            .await?;
        let mut masters = Vec::new();
        for range in slots {
            // [start, end, [host, port, id, ...], replicas...]
            let RedisValue::Array(fields) = range else {
                continue;
            };
            let Some(RedisValue::Array(master)) = fields.get(2) else {
                continue;
            };
            let host = match master.first() {
                Some(RedisValue::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(RedisValue::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let Some(RedisValue::Int(port)) = master.get(1) else {
                continue;
            };
            let address = (host, u16::try_from(*port).unwrap_or(0));
            if !masters.contains(&address) {
                masters.push(address);
            }
        }
        Ok(masters)
    }
}

/// Sends `cmd` on `con`, to the cluster node at `node` when one is given.
pub(crate) async fn send_to(
    mut con: Conn,
    cmd: redis::Cmd,
    node: Option<(String, u16)>,
) -> redis::RedisResult<RedisValue> {
    match (&mut con, node) {
        #[cfg(feature = "cluster")]
        (Conn::Cluster(cluster), Some((host, port))) => {
            use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
            cluster
                .route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
                )
                .await
        }
        _ => cmd.query_async(&mut con).await,
    }
}
