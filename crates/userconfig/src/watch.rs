//! Watching a user's configuration: a handle that always holds the user's latest configuration
//! and its version, kept up to date from the changes the chain learns of (its own writes, the
//! database's change feed for every other writer, the backplane), with no polling.
//!
//! One registration per watched user, shared by every handle of that user and removed when
//! the last handle is dropped; a cap on watched users. One task per storage (started with the
//! first watch) reads the chain's changes ([`TieredCache::subscribe_changes`]) and updates the
//! watched users: a change that carries its value (a write made here, the backplane) or a
//! delete is applied at once; any other (the feed says only "changed at version n") is read
//! from the database, in batches. A burst of changes of one user may be seen as its last one
//! only (a handle holds the latest configuration, like [`tokio::sync::watch`]), but versions
//! only go up, and none is seen twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::Stream;
use tiercache_core::{Change, Entry, TieredCache, Version, WeakTieredCache};
use tokio::sync::{broadcast, watch};

use crate::Key;
use crate::config::UserConfig;
use crate::error::{Error, Result};

/// Default cap on the users one storage watches at once.
pub const DEFAULT_MAX_WATCHED_USERS: usize = 10_000;

/// Users read from the database in one statement when watched users changed.
const LOAD_BATCH: usize = 256;

/// A user's configuration as a watch holds it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WatchedConfig {
    /// The configuration (the defaults, with `user_id` set, when none is stored).
    pub config: Arc<UserConfig>,
    /// The version of the change that made it so: the database's version of the stored
    /// configuration, the version of the delete that removed it, or 0 for a user never
    /// written. Only goes up (unless the database's history is reset: a failover to a server
    /// with another history).
    pub version: Version,
    /// Whether a configuration is stored (false: the defaults, never written or deleted).
    pub stored: bool,
}

impl WatchedConfig {
    pub(crate) fn defaults(user_id: &str, version: Version) -> Self {
        WatchedConfig {
            config: Arc::new(UserConfig::default_for(user_id)),
            version,
            stored: false,
        }
    }

    pub(crate) fn stored(config: Arc<UserConfig>, version: Version) -> Self {
        WatchedConfig {
            config,
            version,
            stored: true,
        }
    }
}

/// A watch of one user's configuration, from
/// [`UserConfigStorage::watch`](crate::UserConfigStorage::watch): always holds the latest
/// configuration and its version ([`current`](Self::current)), waits for the next one
/// ([`changed`](Self::changed)), or streams them ([`into_stream`](Self::into_stream)).
/// Cheap to clone; the user stays watched until the last clone is dropped.
#[derive(Clone)]
pub struct ConfigWatch {
    receiver: watch::Receiver<WatchedConfig>,
    registration: Arc<Registration>,
}

impl std::fmt::Debug for ConfigWatch {
    /// Never the configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatch")
            .field("user_id", &self.registration.user)
            .field("version", &self.receiver.borrow().version)
            .finish()
    }
}

impl ConfigWatch {
    /// The watched user.
    #[must_use]
    pub fn user_id(&self) -> &str {
        &self.registration.user
    }

    /// The latest configuration, from the handle (no cache lookup, no I/O).
    #[must_use]
    pub fn current(&self) -> WatchedConfig {
        self.receiver.borrow().clone()
    }

    /// Waits for a configuration newer than the last one this handle returned (from
    /// [`changed`](Self::changed), or [`current`](Self::current) when it was created), and
    /// returns it. Cancel-safe: dropping the future loses nothing, the next call returns the
    /// change. Once the storage is dropped nothing changes any more, and this waits forever.
    pub async fn changed(&mut self) -> WatchedConfig {
        // The handle holds the registration, and so the sender: it cannot close.
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.receiver.borrow_and_update().clone()
    }

    /// Every configuration after the current one, as a stream (each newer than the last).
    pub fn into_stream(self) -> impl Stream<Item = WatchedConfig> + Send + 'static {
        futures_util::stream::unfold(self, |mut watch| async move {
            let next = watch.changed().await;
            Some((next, watch))
        })
    }
}

/// One watched user: the sender every handle of the user listens to.
struct Registration {
    user: String,
    sender: watch::Sender<WatchedConfig>,
    watches: Weak<Watches>,
    /// Whether a first read from the database landed: later watches of the user need none
    /// (the feed keeps the registration current).
    loaded: AtomicBool,
}

impl Drop for Registration {
    /// The last handle is gone: the user is no longer watched (unless a new watch of the same
    /// user registered meanwhile).
    fn drop(&mut self) {
        if let Some(watches) = self.watches.upgrade() {
            let mut users = watches.lock();
            if users
                .get(&self.user)
                .is_some_and(|held| held.strong_count() == 0)
            {
                users.remove(&self.user);
            }
        }
    }
}

/// A storage's watched users (shared by its clones).
pub(crate) struct Watches {
    users: Mutex<HashMap<String, Weak<Registration>>>,
    limit: usize,
    /// Whether anyone ever watched: writes check it before they take the lock.
    used: AtomicBool,
    /// Whether the task that follows the chain's changes runs.
    following: AtomicBool,
}

impl Watches {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Watches {
            users: Mutex::new(HashMap::new()),
            limit,
            used: AtomicBool::new(false),
            following: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Registration>>> {
        // A panic while the map is held leaves it consistent (every step is one insert or
        // remove).
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many users are watched now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn registration(&self, user: &str) -> Option<Arc<Registration>> {
        self.lock().get(user).and_then(Weak::upgrade)
    }

    /// A handle on `user`'s registration, made (with the defaults at version 0, until the
    /// caller's first read) if there is none.
    fn register(self: &Arc<Self>, user: &str) -> Result<ConfigWatch> {
        let mut users = self.lock();
        let registration = match users.get(user).and_then(Weak::upgrade) {
            Some(held) => held,
            None => {
                // Entries whose last handle is being dropped right now are not counted.
                if users.len() >= self.limit
                    && users.values().filter(|w| w.strong_count() > 0).count() >= self.limit
                {
                    return Err(Error::TooManyWatches { limit: self.limit });
                }
                let registration = Arc::new(Registration {
                    user: user.to_owned(),
                    sender: watch::Sender::new(WatchedConfig::defaults(user, 0)),
                    watches: Arc::downgrade(self),
                    loaded: AtomicBool::new(false),
                });
                users.insert(user.to_owned(), Arc::downgrade(&registration));
                self.used.store(true, Ordering::Relaxed);
                registration
            }
        };
        Ok(ConfigWatch {
            receiver: registration.sender.subscribe(),
            registration,
        })
    }

    /// Offers `user`'s configuration at a version: taken if newer than the one held (or, with
    /// `force`, whatever it is), else ignored.
    pub(crate) fn offer(&self, user: &str, next: WatchedConfig, force: bool) {
        if !self.used.load(Ordering::Relaxed) {
            return;
        }
        if let Some(registration) = self.registration(user) {
            registration.offer(next, force);
        }
    }

    /// Starts the task that follows `chain`'s changes, once.
    fn follow(self: &Arc<Self>, chain: &TieredCache<Key, UserConfig>) {
        if self.following.swap(true, Ordering::AcqRel) {
            return;
        }
        let changes = chain.subscribe_changes();
        tokio::spawn(follow(Arc::downgrade(self), chain.downgrade(), changes));
    }
}

impl Registration {
    fn offer(&self, next: WatchedConfig, force: bool) {
        self.sender.send_if_modified(|held| {
            let newer = next.version > held.version
                // A read that finds nothing stored where the handle holds a configuration (a
                // delete whose version is not known here).
                || (next.version == held.version && held.stored && !next.stored)
                || (force && (next.version != held.version || next.stored != held.stored));
            if newer {
                *held = next;
            }
            newer
        });
    }
}

/// What a batch of changes leaves to read from the database.
#[derive(Default)]
struct Reads {
    users: HashSet<String>,
    /// Every watched user (the chain may have missed changes).
    all: bool,
    /// The database's history changed: take what it says now, whatever the version.
    reset: bool,
}

impl Watches {
    /// Applies one change to the watched users, or notes what to read.
    fn take(&self, change: Change<Key, UserConfig>, reads: &mut Reads) {
        match change {
            Change::Key {
                key,
                version,
                deleted,
                value,
                ..
            } => {
                let Some(registration) = self.registration(&key) else {
                    return;
                };
                match (version, deleted, value) {
                    (Some(version), true, _) => {
                        registration.offer(WatchedConfig::defaults(&key, version), false);
                    }
                    (Some(version), false, Some(value)) => {
                        registration.offer(WatchedConfig::stored(value, version), false);
                    }
                    (Some(version), false, None)
                        if registration.sender.borrow().version >= version => {}
                    _ => {
                        reads.users.insert(key);
                    }
                }
            }
            Change::Reset => {
                reads.all = true;
                reads.reset = true;
            }
            // `Everything`, and kinds of change this version does not know.
            _ => reads.all = true,
        }
    }

    /// Reads `reads` from the database (in batches) and offers what it finds; retries, with a
    /// back-off, while the database cannot answer.
    async fn read(&self, chain: &TieredCache<Key, UserConfig>, reads: Reads) {
        let users: Vec<String> = if reads.all {
            self.lock()
                .iter()
                .filter(|(_, w)| w.strong_count() > 0)
                .map(|(user, _)| user.clone())
                .collect()
        } else {
            reads.users.into_iter().collect()
        };
        for batch in users.chunks(LOAD_BATCH) {
            let mut wait = Duration::from_millis(50);
            loop {
                match read_batch(chain, batch).await {
                    Ok(found) => {
                        for (user, entry) in batch.iter().zip(found) {
                            self.offer(user, watched(user, entry), reads.reset);
                        }
                        break;
                    }
                    Err(error) if error.is_corrupt() => {
                        // One stored configuration does not decode: read the batch one by
                        // one, and leave that user's handle where it is.
                        for user in batch {
                            match chain.source_call("get", chain.source().get(user)).await {
                                Ok(entry) => self.offer(user, watched(user, entry), reads.reset),
                                Err(error) => tracing::warn!(
                                    %error,
                                    "a watched user's configuration could not be read; its \
                                     watch keeps the configuration it holds"
                                ),
                            }
                        }
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "could not read watched users; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }
}

async fn read_batch(
    chain: &TieredCache<Key, UserConfig>,
    users: &[String],
) -> tiercache_core::Result<Vec<Option<Entry<UserConfig>>>> {
    chain
        .source_call("get_many", chain.source().get_many(users))
        .await
}

fn watched(user: &str, entry: Option<Entry<UserConfig>>) -> WatchedConfig {
    match entry {
        Some(Entry {
            value: Some(config),
            version,
            ..
        }) => WatchedConfig::stored(config, version),
        Some(Entry { version, .. }) => WatchedConfig::defaults(user, version),
        // Nothing stored: the version of the delete is not known here; the handle's version
        // stays (see `Registration::offer`).
        None => WatchedConfig::defaults(user, 0),
    }
}

/// The task that follows the chain's changes for every watched user, until the storage (its
/// watches) or the chain is dropped.
async fn follow(
    watches: Weak<Watches>,
    chain: WeakTieredCache<Key, UserConfig>,
    mut changes: broadcast::Receiver<Change<Key, UserConfig>>,
) {
    loop {
        let mut reads = Reads::default();
        let first = changes.recv().await;
        let Some(this) = watches.upgrade() else {
            return;
        };
        match first {
            Ok(change) => this.take(change, &mut reads),
            Err(broadcast::error::RecvError::Lagged(_)) => reads.all = true,
            Err(broadcast::error::RecvError::Closed) => return,
        }
        // Everything already waiting, as one batch (one read per user however many changes).
        loop {
            match changes.try_recv() {
                Ok(change) => this.take(change, &mut reads),
                Err(broadcast::error::TryRecvError::Lagged(_)) => reads.all = true,
                Err(_) => break,
            }
        }
        if reads.all || !reads.users.is_empty() {
            let Some(chain) = chain.upgrade() else { return };
            this.read(&chain, reads).await;
        }
    }
}

impl crate::UserConfigStorage {
    /// Watches `user_id`'s configuration: the handle holds the latest configuration and its
    /// version, updated as changes commit, by this instance, another one, or anyone writing to
    /// the database directly (its change feed), with no polling. A delete reads as the defaults
    /// again (`stored: false`, at the delete's version). Every handle of a user shares one
    /// registration; the user is no longer watched when the last one is dropped.
    ///
    /// ```no_run
    /// # async fn demo(storage: &userconfig::UserConfigStorage) -> userconfig::Result<()> {
    /// let mut theme = storage.watch("alice").await?;
    /// println!("now {}", theme.current().config.preferences.theme);
    /// loop {
    ///     let next = theme.changed().await;
    ///     println!("version {}: {}", next.version, next.config.preferences.theme);
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidUserId`] before any I/O; [`Error::TooManyWatches`] past the cap
    /// ([`max_watched_users`](crate::UserConfigStorageBuilder::max_watched_users)); the
    /// database's error if the first read fails.
    pub async fn watch(&self, user_id: &str) -> Result<ConfigWatch> {
        crate::check_user_id(user_id)?;
        // Following first, registered second, read third: a change that commits after the
        // read began reaches the registration, whichever comes first.
        self.watches.follow(&self.cache);
        let mut watch = self.watches.register(user_id)?;
        // Only the first watch of a user reads the database (until one read landed, each
        // does: a watch never starts from the placeholder).
        if !watch.registration.loaded.load(Ordering::Acquire) {
            // Dropped here (a caller that gives up), the handle unregisters the user.
            let loaded = self.cache.load(&user_id.to_owned()).await?;
            let next = match loaded.value {
                Some(config) => WatchedConfig::stored(config, loaded.version),
                None => WatchedConfig::defaults(user_id, loaded.version),
            };
            watch.registration.offer(next, false);
            watch.registration.loaded.store(true, Ordering::Release);
        }
        watch.receiver.borrow_and_update();
        Ok(watch)
    }

    /// How many users this storage watches now.
    #[must_use]
    pub fn watched_users(&self) -> usize {
        self.watches.len()
    }
}
