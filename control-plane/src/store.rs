//! The durable policy store: every policy resource, the global policy
//! version, the history of recent versions and the bootstrap tokens, in one
//! embedded redb file.
//!
//! What it does:
//! - **One global policy version**, 0 for a new store. Every change (an apply
//!   that changes something, a delete, a rollback that changes something) is
//!   one write transaction that makes it `version + 1`; a resource's
//!   `resource_version` is the version at which it last changed.
//! - **Validation before any write**: a batch is applied whole or not at all.
//!   The merged set (stored ∪ batch, the batch winning) must pass
//!   [`policy::validate_set`]; a delete or rollback must leave a set that
//!   passes it too. A refusal ([`StoreError::Invalid`]) carries every problem.
//! - **Optimistic concurrency**: a document that carries
//!   `metadata.resourceVersion` is applied only if that is still the stored
//!   one. `"0"` means "must not exist yet" (create-only); any other value for
//!   a resource that does not exist is a [`StoreError::Conflict`].
//! - **History**: the complete set of each of the last `history_limit`
//!   versions (the current one included; a new store keeps version 0, the
//!   empty set), for [`Store::rollback`].
//! - **Durability**: every write commits with redb's default durability
//!   (fsync before `commit` returns), so a successful return survives
//!   `kill -9` and power loss; redb repairs an uncleanly closed file on open.
//! - **Tokens** (the `tokens` submodule): bootstrap credentials for workloads, stored as
//!   SHA-256 hashes only, and the deny list of revoked identities.
//!
//! What it does not do: it is blocking (async callers use `spawn_blocking`);
//! it does not tell anyone that the version changed (the API layer publishes
//! a new snapshot after a successful write); it does not authenticate callers
//! or default a token's TTL; it never deletes expired tokens; it holds the
//! file exclusively, so one process (one `Store`) per file.
//!
//! Storage layout (schema 1, recorded in `meta`):
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | `"schema"`, `"version"` | `u64` |
//! | `resources` | `"Kind/namespace/name"` (the namespace always written) | `(resource_version, YAML)`: one document, no `resourceVersion` in it |
//! | `history` | version (`u64`) | that version's complete set: multi-document YAML, sorted by kind, namespace, name |
//! | `tokens` | SHA-256 of the secret (`[u8; 32]`) | JSON record: id, identity, expiry, once, used, revoked |
//! | `token_ids` | token id | SHA-256 of its secret (the index for revoking by id) |
//! | `revoked_identities` | SPIFFE ID | when it was last revoked (Unix seconds): the deny list checked on certificate-authenticated calls (added within schema 1: an older file gets the empty table on open) |
//!
//! Resources are written with [`policy::to_yaml`] and read back with
//! [`policy::parse_documents`]; every resource of a batch is normalised that
//! way before it is compared or stored, so what is stored is exactly what is
//! read back, and "unchanged" means "equal after a round trip".

mod tokens;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use pylon_proto::policy::{self, Kind, PolicyError, PolicyErrors, Resource};
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

pub use tokens::TokenInfo;

const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
const RESOURCES: TableDefinition<'static, &str, (u64, &str)> = TableDefinition::new("resources");
const HISTORY: TableDefinition<'static, u64, &str> = TableDefinition::new("history");

const SCHEMA_KEY: &str = "schema";
const VERSION_KEY: &str = "version";
/// The layout described in the module doc. A file with another schema is
/// refused rather than misread.
const SCHEMA: u64 = 1;

/// Creates an empty store file readable by the owner only, unless one
/// exists (redb creates it with the umask's mode, and then it holds token
/// hashes and the deny list for anyone to read).
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// redb's default page cache is 1 GiB; a policy store is a few megabytes.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The durable policy store. Blocking; `Send + Sync`, share it in an `Arc`.
pub struct Store {
    db: Database,
    history_limit: u64,
    rng: ring::rand::SystemRandom,
}

/// Names one resource: its kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ResourceKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ResourceKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of `resource`.
    pub fn of(resource: &Resource) -> Self {
        ResourceKey::new(
            resource.kind(),
            &resource.metadata.namespace,
            &resource.metadata.name,
        )
    }

    /// `Kind/namespace/name`, the namespace always written. Names and
    /// namespaces are RFC 1123, so they never hold a `/`.
    fn storage_key(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }

    fn from_storage_key(s: &str) -> Option<Self> {
        let mut parts = s.splitn(3, '/');
        let kind = parts.next()?;
        let kind = Kind::ALL.into_iter().find(|k| k.as_str() == kind)?;
        Some(ResourceKey::new(kind, parts.next()?, parts.next()?))
    }
}

/// `Kind/name`, or `Kind/namespace/name` outside the default namespace, as
/// in policy error messages ([`policy::display_name`]).
impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&policy::display_name(
            self.kind,
            &self.namespace,
            &self.name,
        ))
    }
}

/// A resource as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    pub key: ResourceKey,
    /// The global version at which this resource last changed.
    pub resource_version: u64,
    /// `metadata.resource_version` is `Some(resource_version.to_string())`.
    pub resource: Resource,
}

/// What [`Store::apply`] did with one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    Created,
    Configured,
    Unchanged,
}

impl ApplyOutcome {
    /// `created`, `configured` or `unchanged`, as the API reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyOutcome::Created => "created",
            ApplyOutcome::Configured => "configured",
            ApplyOutcome::Unchanged => "unchanged",
        }
    }
}

impl fmt::Display for ApplyOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of [`Store::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The policy version after the apply; unchanged when nothing changed.
    pub version: u64,
    /// One entry per document, in batch order: its key, what happened, and
    /// its resource version now.
    pub results: Vec<(ResourceKey, ApplyOutcome, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The policy would be invalid; every problem, with resource and path.
    #[error("{0}")]
    Invalid(PolicyErrors),
    /// A document's `resourceVersion` is not the stored one.
    #[error("conflict: {key} has resourceVersion {}, the document expects {expected:?}", fmt_actual(.actual))]
    Conflict {
        key: ResourceKey,
        expected: String,
        /// `None`: the resource does not exist.
        actual: Option<u64>,
    },
    #[error("{0} not found")]
    NotFound(ResourceKey),
    /// A rollback target that the history does not keep.
    #[error("policy version {0} is not kept in the history")]
    UnknownVersion(u64),
    /// A malformed request that is not policy: a bad token identity or TTL.
    #[error("{0}")]
    BadRequest(String),
    /// The database: I/O, locking, or a file this build cannot read.
    #[error("policy store: {0}")]
    Db(String),
}

fn fmt_actual(actual: &Option<u64>) -> String {
    match actual {
        Some(v) => v.to_string(),
        None => "none (it does not exist)".to_string(),
    }
}

macro_rules! db_errors {
    ($($t:ty),*) => {
        $(impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        })*
    };
}

db_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn corrupt(what: impl fmt::Display) -> StoreError {
    StoreError::Db(format!("unreadable store: {what}"))
}

/// One stored resource, `metadata.resource_version` cleared.
struct Entry {
    version: u64,
    resource: Resource,
}

/// A batch document, normalised.
struct Doc {
    key: ResourceKey,
    expected: Option<String>,
    resource: Resource,
}

impl Store {
    /// Opens the store at `path`, creating the file and its tables if absent
    /// (the directory must exist). A file left by a process that was killed
    /// is repaired by redb and opens with every committed write.
    /// `history_limit` is how many versions [`Store::history`] keeps (at
    /// least 1, the current one).
    pub fn open(path: &Path, history_limit: usize) -> Result<Store, StoreError> {
        create_private(path).map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        let store = Store {
            db,
            history_limit: u64::try_from(history_limit.max(1)).unwrap_or(u64::MAX),
            rng: ring::rand::SystemRandom::new(),
        };
        let txn = store.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let schema = meta.get(SCHEMA_KEY)?.map(|g| g.value());
            match schema {
                Some(SCHEMA) => {}
                Some(other) => {
                    return Err(StoreError::Db(format!(
                        "{}: store schema {other}, this build reads schema {SCHEMA}",
                        path.display()
                    )));
                }
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA)?;
                    meta.insert(VERSION_KEY, 0)?;
                    txn.open_table(HISTORY)?.insert(0, "")?;
                }
            }
            txn.open_table(RESOURCES)?;
            tokens::create_tables(&txn)?;
            // The limit may be lower than the previous process's.
            store.prune(&mut txn.open_table(HISTORY)?)?;
        }
        txn.commit()?;
        Ok(store)
    }

    /// The current policy version; 0 for a new store.
    pub fn version(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        read_version(&txn.open_table(META)?)
    }

    /// Applies a batch, all or nothing, in one write transaction.
    ///
    /// In order: a batch naming one resource twice, or holding a resource
    /// that does not survive a write/read round trip, is `Invalid`; a
    /// document whose `resourceVersion` is set but is not the stored one is a
    /// `Conflict` (the first such, in batch order; `"0"` means "must not
    /// exist"); the merged set must pass [`policy::validate_set`], else
    /// `Invalid` with every problem. Conflicts come before set validation:
    /// problems found against a set the writer did not see would mislead.
    ///
    /// Documents equal to the stored resource are `Unchanged`; when all are,
    /// nothing is written and the version stays.
    pub fn apply(&self, batch: Vec<Resource>) -> Result<Applied, StoreError> {
        let docs = normalize_batch(batch)?;
        self.write(|txn| {
            let (version, before) = read_current(txn)?;
            for doc in &docs {
                let Some(expected) = &doc.expected else {
                    continue;
                };
                let actual = before.get(&doc.key).map(|e| e.version);
                let matches = match actual {
                    Some(v) => *expected == v.to_string(),
                    None => expected == "0",
                };
                if !matches {
                    return Err(StoreError::Conflict {
                        key: doc.key.clone(),
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            let mut after = resources_of(&before);
            for doc in &docs {
                after.insert(doc.key.clone(), doc.resource.clone());
            }
            validate(&after)?;

            let next = next_version(version)?;
            let results: Vec<_> = docs
                .iter()
                .map(|doc| match before.get(&doc.key) {
                    None => (doc.key.clone(), ApplyOutcome::Created, next),
                    Some(e) if e.resource == doc.resource => {
                        (doc.key.clone(), ApplyOutcome::Unchanged, e.version)
                    }
                    Some(_) => (doc.key.clone(), ApplyOutcome::Configured, next),
                })
                .collect();
            let changed = self.write_version(txn, next, &before, &after)?;
            let version = if changed { next } else { version };
            if changed {
                tracing::info!(version, documents = docs.len(), "policy applied");
            }
            Ok((Applied { version, results }, changed))
        })
    }

    /// Deletes one resource; returns the new version. `NotFound` when it does
    /// not exist; `Invalid` (and nothing changes) when the remaining set would
    /// not validate, e.g. a route still references a deleted Backend.
    pub fn delete(&self, key: &ResourceKey) -> Result<u64, StoreError> {
        self.write(|txn| {
            let (version, before) = read_current(txn)?;
            if !before.contains_key(key) {
                return Err(StoreError::NotFound(key.clone()));
            }
            let mut after = resources_of(&before);
            after.remove(key);
            validate(&after)?;
            let next = next_version(version)?;
            let changed = self.write_version(txn, next, &before, &after)?;
            tracing::info!(version = next, resource = %key, "policy resource deleted");
            Ok((next, changed))
        })
    }

    pub fn get(&self, key: &ResourceKey) -> Result<Option<StoredResource>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(RESOURCES)?;
        let storage_key = key.storage_key();
        let Some(guard) = table.get(storage_key.as_str())? else {
            return Ok(None);
        };
        let (version, yaml) = guard.value();
        let resource = decode_resource(&storage_key, yaml)?;
        Ok(Some(stored(key.clone(), version, resource)))
    }

    /// The stored resources of `kind` (all kinds when `None`) in `namespace`
    /// (all when `None`), sorted by kind (in [`Kind`] order), namespace and
    /// name.
    pub fn list(
        &self,
        kind: Option<Kind>,
        namespace: Option<&str>,
    ) -> Result<Vec<StoredResource>, StoreError> {
        let txn = self.read()?;
        let keep = |key: &ResourceKey| {
            kind.is_none_or(|k| k == key.kind) && namespace.is_none_or(|ns| ns == key.namespace)
        };
        let entries = load(&txn.open_table(RESOURCES)?, keep)?;
        Ok(entries
            .into_iter()
            .map(|(key, e)| stored(key, e.version, e.resource))
            .collect())
    }

    /// The current version and every resource (with its `resourceVersion`),
    /// read in one transaction, sorted as [`Store::list`] sorts.
    pub fn snapshot(&self) -> Result<(u64, Vec<Resource>), StoreError> {
        let txn = self.read()?;
        let version = read_version(&txn.open_table(META)?)?;
        let entries = load(&txn.open_table(RESOURCES)?, |_| true)?;
        let resources = entries
            .into_iter()
            .map(|(key, e)| stored(key, e.version, e.resource).resource)
            .collect();
        Ok((version, resources))
    }

    /// The versions kept for rollback, oldest first; the last is the current
    /// version.
    pub fn history(&self) -> Result<Vec<u64>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(HISTORY)?;
        let mut versions = Vec::new();
        for item in table.iter()? {
            let (version, _) = item?;
            versions.push(version.value());
        }
        Ok(versions)
    }

    /// Makes version `version`'s set current again, as a new version; returns
    /// the version now current. Resources not in that set are removed;
    /// resources that differ from the current ones get the new version, the
    /// others keep theirs. `UnknownVersion` when the history does not keep
    /// `version`. Nothing changes, and the current version is returned, when
    /// `version` is current or its set equals the current one. A kept set
    /// that this build no longer accepts is `Invalid`.
    pub fn rollback(&self, version: u64) -> Result<u64, StoreError> {
        self.write(|txn| {
            let yaml = txn
                .open_table(HISTORY)?
                .get(version)?
                .map(|g| g.value().to_string());
            let Some(yaml) = yaml else {
                return Err(StoreError::UnknownVersion(version));
            };
            let (current, before) = read_current(txn)?;
            if version == current {
                return Ok((current, false));
            }
            let resources = policy::parse_documents(&yaml).map_err(StoreError::Invalid)?;
            policy::validate_set(&resources).map_err(StoreError::Invalid)?;
            let after: BTreeMap<_, _> = resources
                .into_iter()
                .map(|r| (ResourceKey::of(&r), r))
                .collect();
            let next = next_version(current)?;
            let changed = self.write_version(txn, next, &before, &after)?;
            if changed {
                tracing::info!(version = next, from = version, "policy rolled back");
            }
            Ok((if changed { next } else { current }, changed))
        })
    }

    fn read(&self) -> Result<ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }

    /// Runs `f` in a write transaction; commits when it returns `(_, true)`,
    /// aborts when it returns `(_, false)` or an error.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write()?;
        let (out, commit) = f(&txn)?;
        if commit {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(out)
    }

    /// Stages `after` as version `next`, given the resources `before` it:
    /// writes what was added or changed (with `next` as resource version),
    /// removes what is gone, records the version and its set in the history
    /// and prunes it. Returns false, having written nothing, when `after`
    /// equals `before`.
    fn write_version(
        &self,
        txn: &WriteTransaction,
        next: u64,
        before: &BTreeMap<ResourceKey, Entry>,
        after: &BTreeMap<ResourceKey, Resource>,
    ) -> Result<bool, StoreError> {
        let changed: Vec<_> = after
            .iter()
            .filter(|(key, r)| before.get(*key).is_none_or(|e| e.resource != **r))
            .collect();
        let removed: Vec<_> = before
            .keys()
            .filter(|key| !after.contains_key(*key))
            .collect();
        if changed.is_empty() && removed.is_empty() {
            return Ok(false);
        }
        let mut table = txn.open_table(RESOURCES)?;
        for (key, resource) in changed {
            table.insert(
                key.storage_key().as_str(),
                (next, encode_resource(resource).as_str()),
            )?;
        }
        for key in removed {
            table.remove(key.storage_key().as_str())?;
        }
        txn.open_table(META)?.insert(VERSION_KEY, next)?;
        let set: Vec<Resource> = after.values().cloned().collect();
        let mut history = txn.open_table(HISTORY)?;
        history.insert(next, policy::to_yaml(&set).as_str())?;
        self.prune(&mut history)?;
        Ok(true)
    }

    fn prune(&self, history: &mut redb::Table<'_, u64, &'static str>) -> Result<(), StoreError> {
        while history.len()? > self.history_limit {
            history.pop_first()?;
        }
        Ok(())
    }
}

fn read_version(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64, StoreError> {
    meta.get(VERSION_KEY)?
        .map(|g| g.value())
        .ok_or_else(|| corrupt("meta has no version"))
}

fn next_version(version: u64) -> Result<u64, StoreError> {
    version
        .checked_add(1)
        .ok_or_else(|| StoreError::Db("the policy version cannot grow further".into()))
}

/// The current version and resources, read inside a write transaction.
fn read_current(txn: &WriteTransaction) -> Result<(u64, BTreeMap<ResourceKey, Entry>), StoreError> {
    let version = read_version(&txn.open_table(META)?)?;
    let entries = load(&txn.open_table(RESOURCES)?, |_| true)?;
    Ok((version, entries))
}

/// The stored resources whose key passes `keep`, decoded, in key order.
fn load(
    table: &impl ReadableTable<&'static str, (u64, &'static str)>,
    keep: impl Fn(&ResourceKey) -> bool,
) -> Result<BTreeMap<ResourceKey, Entry>, StoreError> {
    let mut entries = BTreeMap::new();
    for item in table.iter()? {
        let (storage_key, value) = item?;
        let storage_key = storage_key.value();
        let key = ResourceKey::from_storage_key(storage_key)
            .ok_or_else(|| corrupt(format!("resource key {storage_key:?}")))?;
        if !keep(&key) {
            continue;
        }
        let (version, yaml) = value.value();
        let resource = decode_resource(storage_key, yaml)?;
        if ResourceKey::of(&resource) != key {
            return Err(corrupt(format!(
                "resource under {storage_key:?} is {}",
                resource.display_name()
            )));
        }
        entries.insert(key, Entry { version, resource });
    }
    Ok(entries)
}

fn resources_of(entries: &BTreeMap<ResourceKey, Entry>) -> BTreeMap<ResourceKey, Resource> {
    entries
        .iter()
        .map(|(key, e)| (key.clone(), e.resource.clone()))
        .collect()
}

fn validate(set: &BTreeMap<ResourceKey, Resource>) -> Result<(), StoreError> {
    let resources: Vec<Resource> = set.values().cloned().collect();
    policy::validate_set(&resources).map_err(StoreError::Invalid)
}

fn stored(key: ResourceKey, version: u64, mut resource: Resource) -> StoredResource {
    resource.metadata.resource_version = Some(version.to_string());
    StoredResource {
        key,
        resource_version: version,
        resource,
    }
}

/// One YAML document, without `resourceVersion` (the table holds it).
fn encode_resource(resource: &Resource) -> String {
    if resource.metadata.resource_version.is_none() {
        return policy::to_yaml(std::slice::from_ref(resource));
    }
    let mut resource = resource.clone();
    resource.metadata.resource_version = None;
    policy::to_yaml(&[resource])
}

fn decode_resource(storage_key: &str, yaml: &str) -> Result<Resource, StoreError> {
    let mut resources = policy::parse_documents(yaml)
        .map_err(|e| corrupt(format!("resource {storage_key:?}: {e}")))?;
    match (resources.pop(), resources.is_empty()) {
        (Some(resource), true) => Ok(resource),
        _ => Err(corrupt(format!(
            "resource {storage_key:?} is not one document"
        ))),
    }
}

/// Takes each document's `resourceVersion` out, round-trips the rest
/// through YAML (what will be stored is what is compared), and refuses a
/// batch that names a resource twice. Every problem is reported.
fn normalize_batch(batch: Vec<Resource>) -> Result<Vec<Doc>, StoreError> {
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    let mut docs = Vec::with_capacity(batch.len());
    for mut resource in batch {
        let expected = resource.metadata.resource_version.take();
        let key = ResourceKey::of(&resource);
        if !seen.insert(key.clone()) {
            problems.push(PolicyError::new(
                key.to_string(),
                "metadata.name",
                format!("duplicate: {key} appears more than once in this batch"),
            ));
            continue;
        }
        let round = policy::parse_documents(&encode_resource(&resource));
        match round.map(|mut r| (r.pop(), r.is_empty())) {
            Ok((Some(resource), true)) => docs.push(Doc {
                key,
                expected,
                resource,
            }),
            Ok(_) => problems.push(PolicyError::new(
                key.to_string(),
                "",
                "does not write as one YAML document",
            )),
            // Lines would point into YAML the caller never saw.
            Err(errors) => problems.extend(errors.into_iter().map(|mut e| {
                e.line = None;
                e
            })),
        }
    }
    if problems.is_empty() {
        Ok(docs)
    } else {
        Err(StoreError::Invalid(PolicyErrors(problems)))
    }
}
