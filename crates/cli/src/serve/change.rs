//! A change to one user's configuration under RFC 9110 preconditions: `PUT`, `PATCH` (an RFC
//! 7386 merge patch) and `DELETE`, each a compare-and-set the database decides
//! (`docs/architecture.md`, "Conditional requests").

use std::sync::Arc;

use serde_json::Value;
use userconfig::{MAX_MODIFY_ATTEMPTS, UserConfig, UserConfigStorage, conflict_backoff};

use super::conditional::Preconditions;
use super::error::ApiError;

/// What a request changes.
pub(crate) enum Change {
    Put(Box<UserConfig>),
    Patch(Value),
    Delete,
}

/// A change's outcome.
#[derive(Clone, Copy)]
pub(crate) struct Done {
    pub(crate) version: u64,
    pub(crate) created: bool,
}

/// What a change believes is stored: its version, and its value when the change needs it.
struct Seen {
    version: u64,
    config: Option<Arc<UserConfig>>,
    /// Read from the database (or told by its refusal), not guessed from a cache.
    known: bool,
}

impl Seen {
    fn from(fetched: userconfig::FetchedConfig, known: bool) -> Seen {
        Seen {
            version: fetched.version,
            config: Some(fetched.config),
            known,
        }
    }
}

/// Makes `change` under `preconditions` as a compare-and-set against the version they let
/// through: the one they pin (`If-Match: "N"`, `If-None-Match: *`), else the cached version,
/// a guess the database checks. A guess that fails the preconditions is read again from the
/// database before a 412; a compare-and-set that loses to another writer learns the stored
/// version and tries again while the preconditions still hold, up to
/// [`MAX_MODIFY_ATTEMPTS`] times (then 409; an unconditional `PUT` then writes
/// unconditionally).
pub(crate) async fn change(
    storage: &UserConfigStorage,
    id: &str,
    preconditions: &Preconditions,
    change: &Change,
) -> Result<Done, ApiError> {
    let patching = matches!(change, Change::Patch(_));
    let mut seen = match preconditions.pinned() {
        Some(version) if !patching => Seen {
            version,
            config: None,
            known: false,
        },
        _ => Seen::from(storage.fetch_user_config(id).await?, false),
    };
    for attempt in 1..=MAX_MODIFY_ATTEMPTS {
        while !preconditions.allow(seen.version) {
            if seen.known {
                return Err(ApiError::precondition_failed(seen.version));
            }
            seen = Seen::from(storage.load_user_config(id).await?, true);
        }
        let result = match change {
            Change::Put(config) => {
                storage
                    .update_user_config_if(id, seen.version, config)
                    .await
            }
            Change::Patch(patch) => {
                let base = seen
                    .config
                    .as_deref()
                    .expect("a patch reads the configuration");
                let config = patched(base, patch)?;
                storage
                    .update_user_config_if(id, seen.version, &config)
                    .await
            }
            Change::Delete => storage.delete_user_config_if(id, seen.version).await,
        };
        let current = match result {
            Ok(version) => {
                let created = seen.version == 0 && version > 0 && !matches!(change, Change::Delete);
                return Ok(Done { version, created });
            }
            Err(e) => e.conflict().ok_or(e)?,
        };
        // Another writer was first: what the database holds now, then (writers on one user
        // taking turns rather than colliding again) another try.
        seen = if patching {
            Seen::from(storage.load_user_config(id).await?, true)
        } else {
            Seen {
                version: current,
                config: None,
                known: true,
            }
        };
        if attempt < MAX_MODIFY_ATTEMPTS && preconditions.allow(seen.version) {
            tokio::time::sleep(conflict_backoff(attempt)).await;
        }
    }
    if !preconditions.allow(seen.version) {
        // The last writer moved it where the preconditions no longer hold.
        return Err(ApiError::precondition_failed(seen.version));
    }
    if preconditions.is_empty()
        && let Change::Put(config) = change
    {
        // Last writer wins: a plain write (200: it was surely stored by the others).
        let version = storage.update_user_config(id, config).await?;
        return Ok(Done {
            version,
            created: false,
        });
    }
    Err(userconfig::Error::TooManyConflicts {
        attempts: MAX_MODIFY_ATTEMPTS,
    }
    .into())
}

/// `base` with the merge patch applied, or why it no longer is a configuration.
fn patched(base: &UserConfig, patch: &Value) -> Result<UserConfig, ApiError> {
    let mut document = serde_json::to_value(base).expect("configs serialize");
    merge_patch(&mut document, patch);
    serde_json::from_value(document).map_err(|e| {
        userconfig::Error::InvalidConfig(format!("the patched configuration: {e}")).into()
    })
}

/// RFC 7386's merge: `null` removes, objects merge member by member, anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let object = target.as_object_mut().expect("made an object");
    for (name, value) in members {
        if value.is_null() {
            object.remove(name);
        } else {
            merge_patch(object.entry(name.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// RFC 7386, appendix A.
    #[test]
    fn merge_patch_follows_the_rfc_examples() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut document = target.clone();
            merge_patch(&mut document, &patch);
            assert_eq!(document, expected, "{target} patched with {patch}");
        }
    }
}
