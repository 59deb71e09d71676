//! Tests against a real Redis: a client for `REDIS_URL` (checked with a PING) and key prefixes
//! that keep parallel tests apart.
//!
//! ```no_run
//! # async fn demo() {
//! use tiercache_testkit::redis_env;
//!
//! let client = redis_env::redis_client().await; // panics, naming REDIS_URL, if unreachable
//! let prefix = redis_env::unique_prefix("my test"); // "tc_my_test_<pid>_<n>_<t>:"
//! # let _ = (client, prefix); }
//! ```

use crate::env;

/// A client for [`env::redis_url`], after a successful PING.
///
/// # Panics
/// If Redis cannot be reached, with a message naming `REDIS_URL` and the command that starts
/// the local server.
pub async fn redis_client() -> redis::Client {
    let url = env::redis_url();
    let fail = |e: &dyn std::fmt::Display| -> ! {
        panic!(
            "{}",
            env::unreachable("Redis", env::REDIS_URL_VAR, env::REDIS_START, e)
        )
    };
    let client = redis::Client::open(url.as_str()).unwrap_or_else(|e| fail(&e));
    let ping = async {
        let mut con = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut con).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), ping).await {
        Ok(Ok(_)) => client,
        Ok(Err(e)) => fail(&e),
        Err(_) => fail(&"no answer to PING within 3 s"),
    }
}

/// [`env::redis_url`], after checking that Redis answers (see [`redis_client`]).
pub async fn redis_url() -> String {
    redis_client().await;
    env::redis_url()
}

/// A key prefix no other test uses: [`env::unique_name`] followed by `:`.
#[must_use]
pub fn unique_prefix(tag: &str) -> String {
    format!("{}:", env::unique_name(tag))
}
