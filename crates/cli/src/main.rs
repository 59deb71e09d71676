//! `userconfig`: the workload simulator for the cache chain, and commands for operators.
//!
//! ```text
//! userconfig simulate                 # the main job: a realistic workload, per-tier report
//! userconfig get <user-id>            # the configuration, as JSON (version and tier on stderr)
//! userconfig set <user-id> <json|->   # store a configuration (from the argument or stdin)
//!     [--if-version N]                #   only if the stored version is still N (0: none)
//! userconfig delete <user-id>         # delete a stored configuration (defaults again)
//! userconfig invalidate <user-id>     # drop a user from every cache
//! userconfig warm <ids..> [--file f]  # load users into the caches ahead of demand
//! userconfig stats                    # the cache statistics, as JSON
//! ```
//!
//! Servers come from `REDIS_URL` and `DATABASE_URL` (or `--redis-url` / `--database-url`);
//! with neither, everything runs on the embedded default: memory over an SQLite file.
//!
//! A command that changes something waits (`--flush-timeout-ms`, 5 s by default) for every
//! cache to take it before it exits; if one could not (Redis unreachable), it says which and
//! exits with code 5: the database has the change, a cache may still serve the old value.
//! `set --if-version` refused because someone changed the user since that version exits with
//! code 6 and names the stored version.

#![forbid(unsafe_code)]

mod plot;
mod simulate;
mod workload;

use std::fmt;
use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use userconfig::{UserConfig, UserConfigStorage};

/// Per-user configuration over memory, Redis and a database.
#[derive(Debug, Parser)]
#[command(name = "userconfig", version, about)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

/// Where the servers are.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Connection {
    /// Redis URL (redis://, rediss://); defaults to $REDIS_URL; without either, no Redis tier.
    #[arg(long, global = true, env = "REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
    /// A Redis Cluster's seed nodes (comma-separated redis:// URLs), instead of --redis-url;
    /// defaults to $REDIS_CLUSTER_NODES.
    #[arg(
        long,
        global = true,
        env = "REDIS_CLUSTER_NODES",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub(crate) redis_cluster: Vec<String>,
    /// Database URL (postgres://..., sqlite:path); defaults to $DATABASE_URL; without either,
    /// an SQLite file (userconfig.sqlite3; simulate uses a temporary one).
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub(crate) database_url: Option<String>,
    /// Milliseconds a command waits, before it exits, for the caches to take what it changed
    /// (invalidations Redis missed, messages to the other instances); what is still undone
    /// then is reported and the exit code is 5.
    #[arg(long, global = true, default_value_t = 5000)]
    pub(crate) flush_timeout_ms: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a realistic workload against the chain and report per-tier hit rates, latencies and
    /// database reads saved.
    Simulate(simulate::SimulateArgs),
    /// Print a user's configuration as JSON.
    Get {
        /// The user id.
        user_id: String,
    },
    /// Store a user's configuration (JSON; missing fields get defaults, unknown fields are
    /// kept).
    Set {
        /// The user id.
        user_id: String,
        /// The configuration as JSON, or `-` to read it from standard input.
        json: String,
        /// Store it only if the stored version is still this one (0: nothing stored), as one
        /// step in the database (compare-and-set); otherwise exit with code 6.
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
    },
    /// Delete a user's stored configuration (the user reads as the defaults again).
    Delete {
        /// The user id.
        user_id: String,
    },
    /// Remove a user from every cache tier (after a change made to the database directly).
    Invalidate {
        /// The user id.
        user_id: String,
    },
    /// Load users' configurations into the caches ahead of demand, in batches.
    Warm {
        /// User ids.
        user_ids: Vec<String>,
        /// A file of user ids, one per line, read as well.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Users per batch call to each tier.
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// Print the cache statistics as JSON.
    Stats,
}

/// A failure to report: its message, never a configuration value or a URL, and the exit code.
#[derive(Debug)]
pub(crate) struct Failure(String, u8);

/// Exit code of a change the database took but a cache could not (it may serve the old
/// value until its TTL).
const EXIT_UNREACHED: u8 = 5;
/// Exit code of a compare-and-set (`set --if-version`) refused because the stored version moved
/// on.
const EXIT_CONFLICT: u8 = 6;

impl Failure {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Failure(message.into(), 1)
    }

    fn code(&self) -> ExitCode {
        ExitCode::from(self.1)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An error and its sources, as one line.
fn explain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

impl From<userconfig::Error> for Failure {
    fn from(e: userconfig::Error) -> Self {
        let code = if e.conflict().is_some() {
            EXIT_CONFLICT
        } else {
            1
        };
        Failure(explain(&e), code)
    }
}

/// Waits for what `done` changed to reach every cache, within the command's flush time
/// limit; reports what could not, with exit code 5.
async fn finish(storage: &UserConfigStorage, done: &str, within: Duration) -> Result<(), Failure> {
    match storage.flush(within).await {
        Ok(()) => Ok(()),
        Err(e) => Err(Failure(
            format!(
                "{done}, but not every cache took it ({}); another instance may serve the old \
                 configuration until its cache entry expires",
                explain(&e)
            ),
            EXIT_UNREACHED,
        )),
    }
}

impl Connection {
    /// Empty values count as unset (`REDIS_URL= userconfig ...`).
    fn normalized(self) -> Self {
        Connection {
            redis_url: self.redis_url.filter(|u| !u.is_empty()),
            redis_cluster: self
                .redis_cluster
                .into_iter()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty())
                .collect(),
            database_url: self.database_url.filter(|u| !u.is_empty()),
            flush_timeout_ms: self.flush_timeout_ms,
        }
    }

    /// Adds the Redis tier, if one is configured.
    pub(crate) fn redis(
        &self,
        mut builder: userconfig::UserConfigStorageBuilder,
    ) -> userconfig::UserConfigStorageBuilder {
        if let Some(url) = &self.redis_url {
            builder = builder.redis_url(url.clone());
        }
        if !self.redis_cluster.is_empty() {
            builder = builder.redis_cluster(self.redis_cluster.clone());
        }
        builder
    }

    async fn storage(&self) -> Result<UserConfigStorage, Failure> {
        let mut builder = self.redis(UserConfigStorage::builder());
        if let Some(url) = &self.database_url {
            builder = builder.database_url(url.clone());
        }
        Ok(builder.build().await?)
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let connection = cli.connection.normalized();
    let within = Duration::from_millis(connection.flush_timeout_ms);
    match cli.command {
        Command::Simulate(args) => simulate::run(args, connection).await,
        Command::Get { user_id } => {
            let storage = connection.storage().await?;
            let fetched = storage.fetch_user_config(&user_id).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&*fetched.config).expect("configs serialize")
            );
            if fetched.stored {
                eprintln!(
                    "version {} from {}",
                    fetched.version,
                    fetched.answered_by.as_str()
                );
            } else {
                eprintln!(
                    "not stored: the defaults (from {})",
                    fetched.answered_by.as_str()
                );
            }
            // Let the back-fill land; a fill that cannot is no error.
            let _ = storage.flush(within).await;
            Ok(())
        }
        Command::Set {
            user_id,
            json,
            if_version,
        } => {
            let text = if json == "-" {
                let mut buffer = String::new();
                std::io::stdin()
                    .read_to_string(&mut buffer)
                    .map_err(|e| Failure::new(format!("cannot read standard input: {e}")))?;
                buffer
            } else {
                json
            };
            let config: UserConfig = serde_json::from_str(&text)
                .map_err(|e| Failure::new(format!("the configuration is not valid JSON: {e}")))?;
            let storage = connection.storage().await?;
            let version = match if_version {
                Some(expected) => {
                    storage
                        .update_user_config_if(&user_id, expected, &config)
                        .await?
                }
                None => storage.update_user_config(&user_id, &config).await?,
            };
            eprintln!("stored version {version}");
            finish(&storage, &format!("stored version {version}"), within).await
        }
        Command::Delete { user_id } => {
            let storage = connection.storage().await?;
            let version = storage.delete_user_config(&user_id).await?;
            if version == 0 {
                eprintln!("nothing was stored");
                return Ok(());
            }
            eprintln!("deleted at version {version}");
            finish(&storage, &format!("deleted at version {version}"), within).await
        }
        Command::Invalidate { user_id } => {
            let storage = connection.storage().await?;
            // A tier that could not be reached gets the invalidation replayed: whether it was
            // in the end is for `finish` to say.
            if let Err(e) = storage.invalidate_user_config_cache(&user_id).await {
                if !e.is_transient() {
                    return Err(e.into());
                }
            }
            finish(&storage, "invalidated what could be reached", within).await?;
            eprintln!("invalidated");
            Ok(())
        }
        Command::Warm {
            mut user_ids,
            file,
            batch,
        } => {
            if let Some(path) = file {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Failure::new(format!("cannot read {}: {e}", path.display())))?;
                user_ids.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
            let storage = connection.storage().await?;
            let ids: Vec<&str> = user_ids.iter().map(String::as_str).collect();
            let found = storage.warm(&ids, batch).await?;
            let _ = storage.flush(within).await;
            eprintln!(
                "warmed {} users ({found} with a stored configuration)",
                ids.len()
            );
            Ok(())
        }
        Command::Stats => {
            let storage = connection.storage().await?;
            if let Some(redis) = storage.redis() {
                // Refresh the `connected` flag before reporting it.
                let _ = redis.ping().await;
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&storage.get_cache_stats()).expect("stats serialize")
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            e.code()
        }
    }
}
