//! The operator commands: `get`, `set`, `delete`, `watch`, `history`, `rollback`, `diff`,
//! `invalidate`, `warm`, `stats`, `migrate`. Each prints a line for people on standard error, and with `--json` one JSON
//! document on standard output (`watch`: always a JSON line per change).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use userconfig::UserConfig;

use crate::{Connection, Failure, finish};

/// Prints `value` on standard output if `json`, and `human` on standard error.
fn report(json: bool, value: &Value, human: &str) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("JSON values print")
        );
    }
    if !human.is_empty() {
        eprintln!("{human}");
    }
}

/// Reads `path`, or standard input for `-`.
pub(crate) fn read_input(path: &Path) -> Result<String, Failure> {
    if path == Path::new("-") {
        let mut buffer = String::new();
        std::io::stdin()
            .read_to_string(&mut buffer)
            .map_err(|e| Failure::new(format!("cannot read standard input: {e}")))?;
        Ok(buffer)
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::new(format!("cannot read {}: {e}", path.display())))
    }
}

/// `watch`: a JSON line per configuration (`user_id`, `version`, `stored`, `config`), the one
/// now first, until Ctrl-C, SIGTERM or `count` lines.
pub(crate) async fn watch(
    connection: &Connection,
    user_id: &str,
    count: Option<usize>,
) -> Result<(), Failure> {
    use std::io::Write;
    userconfig::check_user_id(user_id)?;
    let storage = connection.storage().await?;
    let mut watch = storage.watch(user_id).await?;
    eprintln!("watching {user_id:?} (Ctrl-C to stop)");
    let mut next = watch.current();
    let mut printed = 0;
    loop {
        let line = json!({
            "user_id": user_id,
            "version": next.version,
            "stored": next.stored,
            "config": &*next.config,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| Failure::new(format!("cannot write to standard output: {e}")))?;
        drop(out);
        printed += 1;
        if count.is_some_and(|count| printed >= count) {
            return Ok(());
        }
        tokio::select! {
            changed = watch.changed() => next = changed,
            () = crate::stop_signal() => return Ok(()),
        }
    }
}

pub(crate) async fn get(
    connection: &Connection,
    user_id: &str,
    require_stored: bool,
    json: bool,
    within: Duration,
) -> Result<(), Failure> {
    userconfig::check_user_id(user_id)?;
    let storage = connection.storage().await?;
    let fetched = storage.fetch_user_config(user_id).await?;
    // Let the back-fill land; a fill that cannot is no error.
    let _ = storage.flush(within).await;
    if require_stored && !fetched.stored {
        return Err(Failure::not_found(format!(
            "no configuration is stored for {user_id:?}"
        )));
    }
    let config = serde_json::to_value(&*fetched.config).expect("configs serialize");
    let human = if fetched.stored {
        format!(
            "stored, version {} (from {})",
            fetched.version,
            fetched.answered_by.as_str()
        )
    } else {
        format!(
            "not stored: the defaults (from {})",
            fetched.answered_by.as_str()
        )
    };
    if json {
        report(
            true,
            &json!({
                "user_id": user_id,
                "stored": fetched.stored,
                "version": fetched.version,
                "answered_by": fetched.answered_by.as_str(),
                "config": config,
            }),
            &human,
        );
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&config).expect("configs serialize")
        );
        eprintln!("{human}");
    }
    Ok(())
}

pub(crate) async fn set(
    connection: &Connection,
    user_id: &str,
    text: &str,
    if_version: Option<u64>,
    json: bool,
    within: Duration,
) -> Result<(), Failure> {
    userconfig::check_user_id(user_id)?;
    let text = if text == "-" {
        read_input(Path::new("-"))?
    } else {
        text.to_owned()
    };
    let config: UserConfig = serde_json::from_str(&text)
        .map_err(|e| Failure::invalid(format!("the configuration is not valid JSON: {e}")))?;
    let storage = connection.storage().await?;
    let version = match if_version {
        Some(expected) => {
            storage
                .update_user_config_if(user_id, expected, &config)
                .await?
        }
        None => storage.update_user_config(user_id, &config).await?,
    };
    let done = format!("stored version {version}");
    report(
        json,
        &json!({ "user_id": user_id, "version": version }),
        &done,
    );
    finish(&storage, &done, within).await
}

pub(crate) async fn delete(
    connection: &Connection,
    user_id: &str,
    if_version: Option<u64>,
    purge_history: bool,
    json: bool,
    within: Duration,
) -> Result<(), Failure> {
    userconfig::check_user_id(user_id)?;
    let storage = connection.storage().await?;
    let version = match if_version {
        Some(expected) => storage.delete_user_config_if(user_id, expected).await?,
        None if purge_history => storage.purge_user_config(user_id).await?,
        None => storage.delete_user_config(user_id).await?,
    };
    let done = if version == 0 {
        "nothing was stored".to_owned()
    } else {
        format!("deleted at version {version}")
    };
    report(
        json,
        &json!({ "user_id": user_id, "deleted": version > 0, "version": version }),
        &done,
    );
    if version == 0 {
        return Ok(());
    }
    finish(&storage, &done, within).await
}

/// `history`: past versions, newest first.
pub(crate) async fn history(
    connection: &Connection,
    user_id: &str,
    limit: usize,
    json: bool,
) -> Result<(), Failure> {
    userconfig::check_user_id(user_id)?;
    let storage = connection.storage().await?;
    let found = storage.history(user_id, limit).await?;
    let versions: Vec<Value> = found
        .iter()
        .map(|r| {
            json!({
                "version": r.version,
                "stored": r.config.is_some(),
                "at": r.at_rfc3339(),
                "author": r.author,
                "config": &*r.config_or_defaults(user_id),
            })
        })
        .collect();
    let human = found
        .iter()
        .map(|r| {
            format!(
                "{:>10}  {}  {:<16} {}",
                r.version,
                r.at_rfc3339(),
                r.author.as_deref().unwrap_or("-"),
                if r.config.is_some() {
                    "stored"
                } else {
                    "deleted"
                }
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    report(
        json,
        &json!({ "user_id": user_id, "versions": versions }),
        if human.is_empty() {
            "no history kept"
        } else {
            &human
        },
    );
    Ok(())
}

/// `rollback`: a past version's configuration stored again, as a new version.
pub(crate) async fn rollback(
    connection: &Connection,
    user_id: &str,
    to_version: u64,
    if_version: Option<u64>,
    json: bool,
    within: Duration,
) -> Result<(), Failure> {
    userconfig::check_user_id(user_id)?;
    let storage = connection.storage().await?;
    let version = storage
        .rollback_user_config(user_id, to_version, if_version)
        .await?;
    let done =
        format!("rolled back to version {to_version}'s configuration: now version {version}");
    report(
        json,
        &json!({ "user_id": user_id, "rolled_back_to": to_version, "version": version }),
        &done,
    );
    finish(&storage, &done, within).await
}

/// `diff`: the JSON Patch from one version to another, on standard output.
pub(crate) async fn diff(
    connection: &Connection,
    user_id: &str,
    from: u64,
    to: u64,
) -> Result<(), Failure> {
    userconfig::check_user_id(user_id)?;
    let storage = connection.storage().await?;
    let patch = storage.diff_user_config(user_id, from, to).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&patch).expect("JSON values print")
    );
    Ok(())
}

pub(crate) async fn invalidate(
    connection: &Connection,
    user_id: &str,
    json: bool,
    within: Duration,
) -> Result<(), Failure> {
    userconfig::check_user_id(user_id)?;
    let storage = connection.storage().await?;
    // A tier that could not be reached gets the invalidation replayed: whether it was in the
    // end is for `finish` to say.
    if let Err(e) = storage.invalidate_user_config_cache(user_id).await
        && !e.is_transient()
    {
        return Err(e.into());
    }
    finish(&storage, "invalidated what could be reached", within).await?;
    report(
        json,
        &json!({ "user_id": user_id, "invalidated": true }),
        "invalidated",
    );
    Ok(())
}

pub(crate) async fn warm(
    connection: &Connection,
    mut user_ids: Vec<String>,
    file: Option<&Path>,
    batch: usize,
    json: bool,
    within: Duration,
) -> Result<(), Failure> {
    if let Some(path) = file {
        user_ids.extend(
            read_input(path)?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    for id in &user_ids {
        userconfig::check_user_id(id)?;
    }
    if batch == 0 {
        return Err(Failure::usage("--batch must be at least 1"));
    }
    let storage = connection.storage().await?;
    let ids: Vec<&str> = user_ids.iter().map(String::as_str).collect();
    let found = storage.warm(&ids, batch).await?;
    let _ = storage.flush(within).await;
    report(
        json,
        &json!({ "users": ids.len(), "stored": found }),
        &format!(
            "warmed {} users ({found} with a stored configuration)",
            ids.len()
        ),
    );
    Ok(())
}

pub(crate) async fn stats(connection: &Connection) -> Result<(), Failure> {
    let storage = connection.storage().await?;
    if let Some(redis) = storage.redis() {
        // Refresh the `connected` flag before reporting it.
        let _ = redis.ping().await;
    }
    // JSON either way: `--json` is accepted for uniformity.
    println!(
        "{}",
        serde_json::to_string_pretty(&storage.get_cache_stats()).expect("stats serialize")
    );
    Ok(())
}

pub(crate) async fn migrate(
    connection: &Connection,
    grant_to: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let storage = connection.storage_with(|b| b.run_migrations(true)).await?;
    let backend = storage.migrate().await?;
    if let Some(role) = grant_to {
        storage.grant_to(role).await?;
    }
    report(
        json,
        &json!({ "database": backend, "migrated": true, "granted_to": grant_to }),
        &match grant_to {
            Some(role) => format!(
                "the {backend} database's tables, log and functions are up to date; {role} may \
                 read and write them"
            ),
            None => format!("the {backend} database's tables, log and functions are up to date"),
        },
    );
    Ok(())
}

/// `userconfig token`: a new service token and its line for the tokens file.
pub(crate) fn token(name: &str, scopes: &str, json: bool) -> Result<(), Failure> {
    let (token, line) = crate::serve::auth::new_token(name, scopes).map_err(Failure::usage)?;
    if json {
        println!("{}", serde_json::json!({ "token": token, "line": line }));
    } else {
        println!("token (give it to the client; it is not stored anywhere): {token}");
        println!("line for the tokens file: {line}");
    }
    Ok(())
}
