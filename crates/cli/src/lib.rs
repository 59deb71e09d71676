//! `userconfig`: the workload simulator for the cache chain, an HTTP service with a live
//! dashboard, and commands for operators.
//!
//! ```text
//! userconfig simulate [--serve ADDR]  # the main job: a realistic workload, per-tier report
//! userconfig serve [--listen ADDR]    # the REST API, /stats, /metrics, health, the dashboard
//! userconfig get <user-id>            # the configuration, as JSON (stored? version? on stderr)
//!     [--require-stored]              #   exit 4 if nothing is stored
//! userconfig set <user-id> <json|->   # store a configuration (from the argument or stdin)
//!     [--if-version N]                #   only if the stored version is still N (0: none)
//! userconfig delete <user-id>         # delete a stored configuration (defaults again)
//! userconfig invalidate <user-id>     # drop a user from every cache
//! userconfig warm <ids..> [--file f]  # load users into the caches ahead of demand (f: - for stdin)
//! userconfig stats                    # the cache statistics, as JSON
//! userconfig migrate [--grant-to ROLE] # create or upgrade the database's objects (privileged role)
//! ```
//!
//! Every command takes `--json`: one JSON document on standard output, errors included
//! (`{"error": {"kind", "message", "exit_code"}}`). Servers and knobs come from the
//! environment (`REDIS_URL`, `DATABASE_URL`, `USERCONFIG_*`: README.md's table) or
//! `--redis-url` / `--database-url`; with neither server, everything runs on the embedded
//! default: memory over an SQLite file. Exit codes: see `failure.rs` (2 usage, 3 invalid
//! input, 4 not found, 5 unavailable, 6 conflict, 1 anything else).
//!
//! A command that changes something waits (`--flush-timeout-ms`, 5 s by default) for every
//! cache to take it before it exits; if one could not (Redis unreachable), it says which and
//! exits with code 5: the database has the change, a cache may still serve the old value.

#![forbid(unsafe_code)]

mod failure;
mod ops;
mod serve;
mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use userconfig::{UserConfigStorage, UserConfigStorageBuilder};

pub(crate) use failure::{Failure, explain};

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

/// `--json`: one JSON document on standard output (errors too).
#[derive(Debug, Clone, Copy, clap::Args)]
struct Output {
    /// Print the result (or the error) as one JSON document on standard output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a realistic workload against the chain and report per-tier hit rates, latencies and
    /// database reads saved.
    Simulate(simulate::SimulateArgs),
    /// Serve the configurations over HTTP, with /stats, /metrics, /healthz, /readyz and the
    /// live dashboard at /; stops on SIGTERM or Ctrl-C after finishing in-flight requests.
    Serve {
        #[command(flatten)]
        args: serve::ServeArgs,
        #[command(flatten)]
        output: Output,
    },
    /// Print a user's configuration as JSON (whether one is stored, and its version, on
    /// standard error).
    Get {
        /// The user id.
        user_id: String,
        /// Fail with exit code 4 if no configuration is stored (rather than print the
        /// defaults).
        #[arg(long)]
        require_stored: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Store a user's configuration (JSON; missing fields get defaults, unknown fields are
    /// kept).
    Set {
        /// The user id.
        user_id: String,
        /// The configuration as JSON, or `-` to read it from standard input.
        json_config: String,
        /// Store it only if the stored version is still this one (0: nothing stored), as one
        /// step in the database (compare-and-set); otherwise exit with code 6.
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
        #[command(flatten)]
        output: Output,
    },
    /// Delete a user's stored configuration (the user reads as the defaults again).
    Delete {
        /// The user id.
        user_id: String,
        /// Delete it only if the stored version is still this one, as one step in the
        /// database; otherwise exit with code 6 (nothing is deleted).
        #[arg(long, value_name = "N", conflicts_with = "purge_history")]
        if_version: Option<u64>,
        /// Also remove every past version of it (deletion for privacy).
        #[arg(long)]
        purge_history: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Print a user's past configurations, newest first (every change by any writer the
    /// database keeps, 30 days by default): version, time, author, and the configuration.
    History {
        /// The user id.
        user_id: String,
        /// Versions to print, at most 1000.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        output: Output,
    },
    /// Store a past version's configuration again, as a new version (exit code 6 if the
    /// configuration changed since it was read, or since `--if-version`).
    Rollback {
        /// The user id.
        user_id: String,
        /// The version whose configuration to store again.
        to_version: u64,
        /// Only if the stored version is still this one.
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
        #[command(flatten)]
        output: Output,
    },
    /// Print the JSON Patch (RFC 6902) that turns a user's configuration at one version into
    /// another version's.
    Diff {
        /// The user id.
        user_id: String,
        /// The version to compare from.
        from: u64,
        /// The version to compare to.
        to: u64,
    },
    /// Follow a user's configuration: one JSON line on standard output for the configuration
    /// now, then one per change (by anyone, with plain SQL too), until Ctrl-C or SIGTERM.
    Watch {
        /// The user id.
        user_id: String,
        /// Stop after this many lines (the first included).
        #[arg(long, value_name = "N")]
        count: Option<usize>,
    },
    /// Remove a user from every cache tier (after a change made to the database directly).
    Invalidate {
        /// The user id.
        user_id: String,
        #[command(flatten)]
        output: Output,
    },
    /// Load users' configurations into the caches ahead of demand, in batches.
    Warm {
        /// User ids.
        user_ids: Vec<String>,
        /// A file of user ids, one per line (`-`: standard input), read as well.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Users per batch call to each tier.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[command(flatten)]
        output: Output,
    },
    /// Print the cache statistics as JSON.
    Stats {
        #[command(flatten)]
        output: Output,
    },
    /// Make a service token for `serve`: prints the token (give it to the client) and its line
    /// for the tokens file (which holds only its hash). Nothing is stored.
    Token {
        /// A name for it (in the logs when it is refused).
        #[arg(long)]
        name: String,
        /// What it may do, comma-separated: read, write, admin.
        #[arg(long, default_value = "read")]
        scopes: String,
        #[command(flatten)]
        output: Output,
    },
    /// Create or upgrade the database's table, change log and functions, then exit. Run it
    /// once per release with a role that may create them; services can then run with a role
    /// that may only read and write (`USERCONFIG_RUN_MIGRATIONS=false`; docs/operations.md).
    Migrate {
        /// Also grant this PostgreSQL role what a service needs (read and write the table,
        /// follow its change log) and nothing more.
        #[arg(long, value_name = "ROLE")]
        grant_to: Option<String>,
        #[command(flatten)]
        output: Output,
    },
}

impl Command {
    /// Whether the command prints JSON (its errors too).
    fn json(&self) -> bool {
        match self {
            Command::Simulate(args) => args.json_to_stdout(),
            Command::Watch { .. } | Command::Diff { .. } => true,
            Command::Serve { output, .. }
            | Command::Get { output, .. }
            | Command::Set { output, .. }
            | Command::Delete { output, .. }
            | Command::History { output, .. }
            | Command::Rollback { output, .. }
            | Command::Invalidate { output, .. }
            | Command::Warm { output, .. }
            | Command::Stats { output }
            | Command::Token { output, .. }
            | Command::Migrate { output, .. } => output.json,
        }
    }
}

/// Waits for what `done` changed to reach every cache, within the command's flush time
/// limit; reports what could not, with exit code 5.
pub(crate) async fn finish(
    storage: &UserConfigStorage,
    done: &str,
    within: Duration,
) -> Result<(), Failure> {
    match storage.flush(within).await {
        Ok(()) => Ok(()),
        Err(e) => Err(Failure::unavailable(format!(
            "{done}, but not every cache took it ({}); another instance may serve the old \
             configuration until its cache entry expires",
            explain(&e)
        ))),
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

    /// A builder with the environment's knobs (`USERCONFIG_*`) and this connection's servers.
    pub(crate) fn builder(&self) -> Result<UserConfigStorageBuilder, Failure> {
        let mut builder = UserConfigStorage::builder().from_env()?;
        if let Some(url) = &self.redis_url {
            builder = builder.redis_url(url.clone());
        }
        if !self.redis_cluster.is_empty() {
            builder = builder.redis_cluster(self.redis_cluster.clone());
        }
        if let Some(url) = &self.database_url {
            builder = builder.database_url(url.clone());
        }
        Ok(builder)
    }

    pub(crate) async fn storage(&self) -> Result<UserConfigStorage, Failure> {
        self.storage_with(|b| b).await
    }

    pub(crate) async fn storage_with(
        &self,
        f: impl FnOnce(UserConfigStorageBuilder) -> UserConfigStorageBuilder,
    ) -> Result<UserConfigStorage, Failure> {
        Ok(f(self.builder()?).build().await?)
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

async fn run(command: Command, connection: Connection) -> Result<(), Failure> {
    let connection = connection.normalized();
    let within = Duration::from_millis(connection.flush_timeout_ms);
    let c = &connection;
    match command {
        Command::Simulate(args) => simulate::run(args, connection).await,
        Command::Serve { args, output } => serve::run(args, connection, output.json, within).await,
        Command::Get {
            user_id,
            require_stored,
            output,
        } => ops::get(c, &user_id, require_stored, output.json, within).await,
        Command::Set {
            user_id,
            json_config,
            if_version,
            output,
        } => ops::set(c, &user_id, &json_config, if_version, output.json, within).await,
        Command::Delete {
            user_id,
            if_version,
            purge_history,
            output,
        } => ops::delete(c, &user_id, if_version, purge_history, output.json, within).await,
        Command::Watch { user_id, count } => ops::watch(c, &user_id, count).await,
        Command::History {
            user_id,
            limit,
            output,
        } => ops::history(c, &user_id, limit, output.json).await,
        Command::Rollback {
            user_id,
            to_version,
            if_version,
            output,
        } => ops::rollback(c, &user_id, to_version, if_version, output.json, within).await,
        Command::Diff { user_id, from, to } => ops::diff(c, &user_id, from, to).await,
        Command::Invalidate { user_id, output } => {
            ops::invalidate(c, &user_id, output.json, within).await
        }
        Command::Warm {
            user_ids,
            file,
            batch,
            output,
        } => ops::warm(c, user_ids, file.as_deref(), batch, output.json, within).await,
        Command::Stats { .. } => ops::stats(c).await,
        Command::Token {
            name,
            scopes,
            output,
        } => ops::token(&name, &scopes, output.json),
        Command::Migrate { grant_to, output } => {
            ops::migrate(c, grant_to.as_deref(), output.json).await
        }
    }
}

/// The service's HTTP routes over `storage` (the REST API, `/stats`, `/metrics`, the health
/// checks and the live dashboard), to serve or to nest in an axum application of your own. It
/// checks nothing about who asks: the application that nests it must authenticate requests
/// before they reach it (or use [`router_with_tokens`]). The dashboard's sampler runs while
/// the router is alive, on the current tokio runtime.
pub fn router(storage: UserConfigStorage) -> axum::Router {
    serve::router_for(vec![storage], 1024 * 1024, serve::auth::Access::open())
}

/// [`router`] with `userconfig serve`'s service tokens: `tokens` is a tokens file's text (one
/// token a line, `name scopes sha256`; docs/security.md), and every route but `/healthz` and
/// the dashboard's page needs a bearer token with the route's scope.
///
/// # Errors
/// A tokens file that does not parse (the message names the line).
pub fn router_with_tokens(
    storage: UserConfigStorage,
    tokens: &str,
) -> Result<axum::Router, String> {
    let tokens = serve::auth::Tokens::parse(tokens)?;
    Ok(serve::router_for(
        vec![storage],
        1024 * 1024,
        serve::auth::Access {
            tokens: Some(tokens),
            jwt: None,
        },
    ))
}

/// How [`router_with_end_users`] checks end-user tokens (JWT): a token whose `sub` is a user
/// may read and change that user's configuration only.
#[derive(Clone, Debug, Default)]
pub struct EndUserTokens {
    /// The HS256 shared secret (at least 32 bytes).
    pub hs256_secret: Option<Vec<u8>>,
    /// A JWKS document of RS256 and ES256 public keys.
    pub jwks: Option<String>,
    /// The `iss` tokens must carry.
    pub issuer: String,
    /// The `aud` tokens must carry.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (at most 300).
    pub leeway_secs: u64,
}

/// [`router_with_tokens`] that also takes end-user tokens: `service_tokens` is a tokens file's
/// text (or `None`: end users only).
///
/// # Errors
/// A tokens file that does not parse, or end-user settings that cannot be used (no key, a
/// secret under 32 bytes, a JWKS with another kind of key, no issuer or audience).
pub fn router_with_end_users(
    storage: UserConfigStorage,
    service_tokens: Option<&str>,
    end_users: &EndUserTokens,
) -> Result<axum::Router, String> {
    let tokens = service_tokens.map(serve::auth::Tokens::parse).transpose()?;
    let jwt = serve::jwt::Jwt::new(
        end_users.hs256_secret.as_deref(),
        end_users.jwks.as_deref(),
        &end_users.issuer,
        &end_users.audience,
        end_users.leeway_secs,
    )?;
    Ok(serve::router_for(
        vec![storage],
        1024 * 1024,
        serve::auth::Access {
            tokens,
            jwt: Some(jwt),
        },
    ))
}

/// The `userconfig` command: parses the arguments, runs, and returns the exit code.
pub fn main() -> ExitCode {
    // Usage errors exit with code 2 (clap's own).
    let cli = Cli::parse();
    // `serve` logs a line per request (target `access`) unless RUST_LOG says otherwise.
    let default_filter = if matches!(cli.command, Command::Serve { .. }) {
        "warn,access=info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let json = cli.command.json();
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
    match runtime.block_on(run(cli.command, cli.connection)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&e.to_json()).expect("JSON values print")
                );
            }
            eprintln!("error: {e}");
            e.code()
        }
    }
}
