//! Tests against a real PostgreSQL: a pool for `DATABASE_URL` and a schema per test, so that
//! tests run in parallel without seeing each other's rows.
//!
//! ```no_run
//! # async fn demo() {
//! use tiercache_testkit::postgres_env;
//!
//! let pool = postgres_env::postgres_pool().await; // panics, naming DATABASE_URL, if unreachable
//! let schema = postgres_env::fresh_schema(&pool).await;
//! // ... give `schema` to the tier under test ...
//! postgres_env::drop_schema(&pool, &schema).await;
//! # }
//! ```

use std::time::Duration;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::env;

/// A small pool for [`env::database_url`], after a successful `SELECT 1`.
///
/// # Panics
/// If PostgreSQL cannot be reached, with a message naming `DATABASE_URL` and the command that
/// starts the local server.
pub async fn postgres_pool() -> PgPool {
    let url = env::database_url();
    let fail = |e: &dyn std::fmt::Display| -> ! {
        panic!(
            "{}",
            env::unreachable("PostgreSQL", env::DATABASE_URL_VAR, env::POSTGRES_START, e)
        )
    };
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(&url)
        .unwrap_or_else(|e| fail(&e));
    match sqlx::query("SELECT 1").execute(&pool).await {
        Ok(_) => pool,
        Err(e) => fail(&e),
    }
}

/// Creates a schema no other test uses ([`env::unique_name`]) and returns its name.
pub async fn fresh_schema(pool: &PgPool) -> String {
    let name = env::unique_name("schema");
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{name}\"")))
        .execute(pool)
        .await
        .expect("CREATE SCHEMA");
    name
}

/// Drops a schema made by [`fresh_schema`], with everything in it. The chains of a test may
/// still be following the schema's change log (a catch-up read, a prune): a drop that loses a
/// deadlock to one of them is tried again.
pub async fn drop_schema(pool: &PgPool, name: &str) {
    assert!(
        name.starts_with("tc_") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "refusing to drop schema {name:?}: not one of fresh_schema's"
    );
    let mut attempts = 0;
    loop {
        let dropped = sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
        )))
        .execute(pool)
        .await;
        match dropped {
            Ok(_) => return,
            Err(_) if attempts < 5 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(error) => panic!("DROP SCHEMA {name}: {error}"),
        }
    }
}

/// A PostgreSQL server of a test's own (`initdb` in a temporary directory, on a spare loopback
/// port, trusting local connections), for what the shared server must never be put through:
/// server settings (`wal_level=logical`), a standby (`pg_basebackup`), a promotion, a stop.
/// Stopped and removed when dropped. Run as root, the server's commands run as `postgres`
/// (`initdb` refuses root).
///
/// ```no_run
/// # async fn demo() {
/// use tiercache_testkit::postgres_env::LocalPostgres;
///
/// let Some(primary) = LocalPostgres::start(&[("wal_level", "logical")]).await else {
///     return; // initdb is not installed: start() said so loudly
/// };
/// let standby = primary.standby().await;
/// let url = standby.url(); // postgres://postgres@127.0.0.1:<port>/postgres
/// standby.promote();
/// # let _ = url; }
/// ```
#[derive(Debug)]
pub struct LocalPostgres {
    dir: std::path::PathBuf,
    port: u16,
}

impl LocalPostgres {
    /// Creates and starts a server with `settings` (`postgresql.conf` lines), and waits until it
    /// accepts connections.
    ///
    /// Returns `None`, after printing a loud message on standard error, only when `initdb` is
    /// not installed (with `CI` set, that is a failure instead).
    ///
    /// # Panics
    /// If the server cannot be created or started.
    pub async fn start(settings: &[(&str, &str)]) -> Option<Self> {
        if !installed("initdb") {
            let message = "initdb is not installed: this test cannot start a PostgreSQL of its \
                           own (install the postgresql package)";
            assert!(std::env::var_os("CI").is_none(), "{message}");
            eprintln!("!!! SKIPPED: {message}");
            return None;
        }
        let server = Self::empty();
        run_as_postgres(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let mut conf = String::from("\n# tiercache test server\nfsync = off\n");
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{value}'\n"));
        }
        append(&format!("{}/postgresql.conf", server.data()), &conf);
        server.pg_ctl_start();
        Some(server)
    }

    /// A hot standby of this server (`pg_basebackup -R`, streaming), started and accepting
    /// read-only connections.
    ///
    /// # Panics
    /// If the backup or the start fails.
    pub async fn standby(&self) -> LocalPostgres {
        let standby = Self::empty();
        run_as_postgres(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &standby.data(),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        standby.pg_ctl_start();
        standby
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Its port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Promotes a standby to a primary (a new timeline), and waits until it is one.
    ///
    /// # Panics
    /// If `pg_ctl promote` fails.
    pub fn promote(&self) {
        let status = postgres_command("pg_ctl")
            .args(["-D", &self.data(), "-w", "promote"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("pg_ctl runs");
        assert!(status.success(), "pg_ctl promote failed");
    }

    /// Stops the server at once (`immediate`: like a crash).
    pub fn stop(&self) {
        let _ = postgres_command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn empty() -> LocalPostgres {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let dir = std::env::temp_dir().join(crate::env::unique_name("tcpg"));
        std::fs::create_dir_all(dir.join("data")).expect("a temporary directory");
        {
            use std::os::unix::fs::PermissionsExt;
            // PostgreSQL refuses a data directory others may read.
            std::fs::set_permissions(dir.join("data"), std::fs::Permissions::from_mode(0o700))
                .expect("the data directory's permissions");
        }
        if running_as_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown runs");
            assert!(status.success(), "chown of {} failed", dir.display());
        }
        LocalPostgres { dir, port }
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        // The server inherits pg_ctl's standard streams: not pipes (reading them to their end
        // would wait for the server to stop).
        let status = postgres_command("pg_ctl")
            .args([
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "start",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("pg_ctl runs");
        assert!(
            status.success(),
            "the test's PostgreSQL did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `program` is on the `PATH` (or in PostgreSQL's own directory).
fn installed(program: &str) -> bool {
    std::path::Path::new(&command(program)).is_file()
}

/// `program`'s path: on the `PATH`, else in Debian's PostgreSQL directory.
fn command(program: &str) -> String {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(program);
            if candidate.is_file() {
                return candidate.display().to_string();
            }
        }
    }
    if let Ok(versions) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut found: Vec<std::path::PathBuf> = versions
            .filter_map(Result::ok)
            .map(|v| v.path().join("bin").join(program))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if let Some(newest) = found.pop() {
            return newest.display().to_string();
        }
    }
    program.to_owned()
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// One of PostgreSQL's programs, as `postgres` when running as root (`runuser`).
fn postgres_command(program: &str) -> std::process::Command {
    let path = command(program);
    if running_as_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        std::process::Command::new(&path)
    }
}

/// Runs one of PostgreSQL's programs (as `postgres` when running as root).
fn run_as_postgres(program: &str, args: &[&str]) {
    let output = postgres_command(program)
        .args(args)
        .output()
        .expect("the program runs");
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn append(path: &str, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("the configuration file opens");
    file.write_all(text.as_bytes()).expect("it is written");
}
