//! Store tests against real redb files in unique temporary directories.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

use super::*;

/// A directory under the system temp dir, removed on drop, with the store
/// file's path in it.
pub(super) struct TempStore {
    dir: PathBuf,
    pub(super) path: PathBuf,
}

impl TempStore {
    pub(super) fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pylon-store-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("policy.redb");
        TempStore { dir, path }
    }

    pub(super) fn open(&self) -> Store {
        self.open_with(10)
    }

    fn open_with(&self, history_limit: usize) -> Store {
        Store::open(&self.path, history_limit).expect("open store")
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn one(yaml: &str) -> Resource {
    let mut resources = policy::parse_documents(yaml).expect("fixture parses");
    assert_eq!(resources.len(), 1, "{yaml}");
    resources.remove(0)
}

fn backend(namespace: &str, name: &str, addr: &str) -> Resource {
    one(&format!(
        "apiVersion: pylon.dev/v1\nkind: Backend\n\
         metadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  endpoints: {{static: [\"{addr}\"]}}\n"
    ))
}

fn route(name: &str, backends: &[&str]) -> Resource {
    let refs: Vec<String> = backends.iter().map(|b| format!("{{name: {b}}}")).collect();
    one(&format!(
        "apiVersion: pylon.dev/v1\nkind: GRPCRoute\nmetadata: {{name: {name}}}\n\
         spec:\n  hostnames: [{name}]\n  rules:\n    - backendRefs: [{}]\n",
        refs.join(", ")
    ))
}

fn traffic_policy(name: &str, target: &str) -> Resource {
    one(&format!(
        "apiVersion: pylon.dev/v1\nkind: BackendTrafficPolicy\nmetadata: {{name: {name}}}\n\
         spec:\n  targetRefs: [{{kind: Backend, name: {target}}}]\n  rateLimit: {{requestsPerSecond: 10}}\n"
    ))
}

fn with_version(mut resource: Resource, version: &str) -> Resource {
    resource.metadata.resource_version = Some(version.to_string());
    resource
}

fn key(kind: Kind, namespace: &str, name: &str) -> ResourceKey {
    ResourceKey::new(kind, namespace, name)
}

fn backend_key(name: &str) -> ResourceKey {
    key(Kind::Backend, "default", name)
}

fn results(applied: &Applied) -> Vec<(String, ApplyOutcome, u64)> {
    applied
        .results
        .iter()
        .map(|(k, o, v)| (k.to_string(), *o, *v))
        .collect()
}

fn names(resources: &[StoredResource]) -> Vec<String> {
    resources.iter().map(|r| r.key.to_string()).collect()
}

fn invalid(err: StoreError) -> Vec<PolicyError> {
    match err {
        StoreError::Invalid(errors) => errors.0,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn the_store_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Store>();
    shareable::<StoreError>();
}

#[test]
fn a_new_store_is_empty_at_version_0() {
    let t = TempStore::new("empty");
    let store = t.open();
    assert_eq!(store.version().unwrap(), 0);
    assert_eq!(store.history().unwrap(), vec![0]);
    assert_eq!(store.snapshot().unwrap(), (0, vec![]));
    assert!(store.list(None, None).unwrap().is_empty());
    assert_eq!(store.get(&backend_key("a")).unwrap(), None);
    assert!(store.list_tokens().unwrap().is_empty());
}

#[test]
fn apply_reports_created_configured_unchanged() {
    use ApplyOutcome::*;
    let t = TempStore::new("outcomes");
    let store = t.open();
    let a = backend("default", "a", "10.0.0.1:80");
    let b = backend("default", "b", "10.0.0.2:80");
    let applied = store.apply(vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(applied.version, 1);
    assert_eq!(
        results(&applied),
        [
            ("Backend/a".into(), Created, 1),
            ("Backend/b".into(), Created, 1)
        ]
    );

    let b2 = backend("default", "b", "10.0.0.22:80");
    let applied = store.apply(vec![a.clone(), b2.clone()]).unwrap();
    assert_eq!(applied.version, 2);
    assert_eq!(
        results(&applied),
        [
            ("Backend/a".into(), Unchanged, 1),
            ("Backend/b".into(), Configured, 2)
        ]
    );

    // Nothing changed: no new version, no history entry.
    let applied = store.apply(vec![b2.clone(), a.clone()]).unwrap();
    assert_eq!(applied.version, 2);
    assert_eq!(
        results(&applied),
        [
            ("Backend/b".into(), Unchanged, 2),
            ("Backend/a".into(), Unchanged, 1)
        ]
    );
    assert_eq!(store.version().unwrap(), 2);
    assert_eq!(store.history().unwrap(), vec![0, 1, 2]);
    assert_eq!(store.apply(vec![]).unwrap().version, 2);

    let got = store.get(&backend_key("a")).unwrap().unwrap();
    assert_eq!(got.resource_version, 1);
    assert_eq!(got.resource, with_version(a, "1"));
    let got = store.get(&backend_key("b")).unwrap().unwrap();
    assert_eq!(
        (got.key, got.resource),
        (backend_key("b"), with_version(b2, "2"))
    );

    // What `get` returns applies back unchanged (its resourceVersion matches).
    let applied = store.apply(vec![got_resource(&store, "b")]).unwrap();
    assert_eq!(results(&applied), [("Backend/b".into(), Unchanged, 2)]);

    let applied = store.apply(vec![route("r", &["a", "b"])]).unwrap();
    assert_eq!(applied.version, 3);
    assert_eq!(results(&applied), [("GRPCRoute/r".into(), Created, 3)]);
}

fn got_resource(store: &Store, name: &str) -> Resource {
    store
        .get(&backend_key(name))
        .unwrap()
        .expect("stored")
        .resource
}

#[test]
fn a_batch_is_all_or_nothing_with_every_problem() {
    let t = TempStore::new("all-or-nothing");
    let store = t.open();
    store
        .apply(vec![backend("default", "a", "10.0.0.1:80")])
        .unwrap();

    let batch = vec![
        backend("default", "c", "10.0.0.3:80"),
        route("r", &["c", "missing"]),
        traffic_policy("p1", "nowhere"),
        traffic_policy("p2", "a"),
        traffic_policy("p3", "a"),
    ];
    let errors = invalid(store.apply(batch).unwrap_err());
    let found: Vec<(String, String)> = errors
        .iter()
        .map(|e| (e.resource.clone(), e.path.clone()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "GRPCRoute/r".into(),
                "spec.rules[0].backendRefs[1].name".into()
            ),
            (
                "BackendTrafficPolicy/p1".into(),
                "spec.targetRefs[0].name".into()
            ),
            (
                "BackendTrafficPolicy/p3".into(),
                "spec.targetRefs[0].name".into()
            ),
        ],
        "{errors:?}"
    );
    assert!(errors[0].message.contains("missing"), "{}", errors[0]);
    assert!(
        errors[2].message.contains("already targeted"),
        "{}",
        errors[2]
    );

    assert_eq!(store.version().unwrap(), 1);
    assert_eq!(store.history().unwrap(), vec![0, 1]);
    assert_eq!(names(&store.list(None, None).unwrap()), ["Backend/a"]);
    assert_eq!(store.get(&backend_key("c")).unwrap(), None);

    // A batch naming one resource twice.
    let errors = invalid(
        store
            .apply(vec![
                backend("default", "c", "10.0.0.3:80"),
                backend("default", "c", "10.0.0.4:80"),
            ])
            .unwrap_err(),
    );
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (errors[0].resource.as_str(), errors[0].path.as_str()),
        ("Backend/c", "metadata.name")
    );
    assert!(errors[0].message.contains("duplicate"), "{}", errors[0]);
    assert_eq!(store.version().unwrap(), 1);
}

#[test]
fn stale_or_unexpected_resource_versions_conflict() {
    let t = TempStore::new("conflict");
    let store = t.open();
    let a = backend("default", "a", "10.0.0.1:80");
    store.apply(vec![a.clone()]).unwrap();

    let a2 = backend("default", "a", "10.0.0.2:80");
    let applied = store.apply(vec![with_version(a2.clone(), "1")]).unwrap();
    assert_eq!(applied.version, 2);

    // Someone else's write happened in between.
    let stale = with_version(backend("default", "a", "10.0.0.3:80"), "1");
    let fresh = backend("default", "x", "10.0.0.9:80");
    match store.apply(vec![fresh, stale]).unwrap_err() {
        StoreError::Conflict {
            key,
            expected,
            actual,
        } => {
            assert_eq!(key, backend_key("a"));
            assert_eq!(expected, "1");
            assert_eq!(actual, Some(2));
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(store.version().unwrap(), 2);
    assert_eq!(
        store.get(&backend_key("x")).unwrap(),
        None,
        "all or nothing"
    );
    assert_eq!(got_resource(&store, "a"), with_version(a2, "2"));

    // "0": create only.
    let n = backend("default", "n", "10.0.0.4:80");
    let applied = store.apply(vec![with_version(n.clone(), "0")]).unwrap();
    assert_eq!(applied.results[0].1, ApplyOutcome::Created);
    let err = store.apply(vec![with_version(n, "0")]).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Conflict {
                actual: Some(3),
                ..
            }
        ),
        "{err:?}"
    );
    // Any other version for a resource that does not exist.
    let err = store
        .apply(vec![with_version(
            backend("default", "m", "10.0.0.5:80"),
            "5",
        )])
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { actual: None, expected, .. } if expected == "5"),
        "{err:?}"
    );
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(store.version().unwrap(), 3);
}

#[test]
fn delete_refuses_to_leave_a_dangling_reference() {
    let t = TempStore::new("delete");
    let store = t.open();
    store
        .apply(vec![
            backend("default", "a", "10.0.0.1:80"),
            backend("default", "b", "10.0.0.2:80"),
            route("r", &["a"]),
        ])
        .unwrap();

    let errors = invalid(store.delete(&backend_key("a")).unwrap_err());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].resource, "GRPCRoute/r");
    assert_eq!(errors[0].path, "spec.rules[0].backendRefs[0].name");
    assert_eq!(store.version().unwrap(), 1);
    assert!(store.get(&backend_key("a")).unwrap().is_some());

    assert_eq!(store.delete(&backend_key("b")).unwrap(), 2);
    assert_eq!(store.get(&backend_key("b")).unwrap(), None);
    assert!(matches!(
        store.delete(&backend_key("b")),
        Err(StoreError::NotFound(k)) if k == backend_key("b")
    ));
    assert_eq!(
        store.delete(&key(Kind::GrpcRoute, "default", "r")).unwrap(),
        3
    );
    assert_eq!(store.delete(&backend_key("a")).unwrap(), 4);
    assert_eq!(store.snapshot().unwrap(), (4, vec![]));
    assert_eq!(store.history().unwrap(), vec![0, 1, 2, 3, 4]);
}

#[test]
fn list_filters_and_sorts_by_kind_namespace_name() {
    let t = TempStore::new("list");
    let store = t.open();
    store
        .apply(vec![
            traffic_policy("p", "b"),
            route("r", &["a"]),
            backend("team-a", "a", "10.0.1.1:80"),
            backend("default", "b", "10.0.0.2:80"),
            backend("default", "a", "10.0.0.1:80"),
        ])
        .unwrap();
    store
        .apply(vec![backend("default", "b", "10.0.0.3:80")])
        .unwrap();

    let all = store.list(None, None).unwrap();
    assert_eq!(
        names(&all),
        [
            "Backend/a",
            "Backend/b",
            "Backend/team-a/a",
            "GRPCRoute/r",
            "BackendTrafficPolicy/p"
        ]
    );
    let versions: Vec<u64> = all.iter().map(|r| r.resource_version).collect();
    assert_eq!(versions, [1, 2, 1, 1, 1]);
    for r in &all {
        assert_eq!(
            r.resource.metadata.resource_version,
            Some(r.resource_version.to_string())
        );
        assert_eq!(ResourceKey::of(&r.resource), r.key);
    }
    let (version, snapshot) = store.snapshot().unwrap();
    assert_eq!(version, 2);
    assert_eq!(
        snapshot,
        all.iter().map(|r| r.resource.clone()).collect::<Vec<_>>()
    );

    assert_eq!(
        names(&store.list(Some(Kind::Backend), None).unwrap()),
        ["Backend/a", "Backend/b", "Backend/team-a/a"]
    );
    assert_eq!(
        names(&store.list(Some(Kind::Backend), Some("default")).unwrap()),
        ["Backend/a", "Backend/b"]
    );
    assert_eq!(
        names(&store.list(None, Some("team-a")).unwrap()),
        ["Backend/team-a/a"]
    );
    assert!(
        store
            .list(Some(Kind::GrpcRoute), Some("team-a"))
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .list(Some(Kind::AuthorizationPolicy), None)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn history_keeps_the_last_versions_up_to_the_limit() {
    let t = TempStore::new("history");
    let store = t.open_with(3);
    for i in 1..=4 {
        let applied = store
            .apply(vec![backend("default", "a", &format!("10.0.0.{i}:80"))])
            .unwrap();
        assert_eq!(applied.version, i);
    }
    assert_eq!(store.history().unwrap(), vec![2, 3, 4]);
    for gone in [0, 1, 5] {
        assert!(matches!(
            store.rollback(gone),
            Err(StoreError::UnknownVersion(v)) if v == gone
        ));
    }
    assert_eq!(store.version().unwrap(), 4);
    drop(store);

    // A lower limit prunes on open; 0 still keeps the current version.
    assert_eq!(t.open_with(2).history().unwrap(), vec![3, 4]);
    assert_eq!(t.open_with(0).history().unwrap(), vec![4]);
    let store = t.open_with(10);
    store
        .apply(vec![backend("default", "a", "10.0.0.9:80")])
        .unwrap();
    assert_eq!(store.history().unwrap(), vec![4, 5]);
}

#[test]
fn rollback_restores_a_kept_set_as_a_new_version() {
    let t = TempStore::new("rollback");
    let store = t.open();
    let a1 = backend("default", "a", "10.0.0.1:80");
    let a3 = backend("default", "a", "10.0.0.3:80");
    let b = backend("default", "b", "10.0.0.2:80");
    let r = route("r", &["b"]);
    store.apply(vec![a1.clone(), b.clone()]).unwrap(); // 1
    store.apply(vec![r.clone()]).unwrap(); // 2
    store.apply(vec![a3.clone()]).unwrap(); // 3

    assert_eq!(store.rollback(1).unwrap(), 4);
    let listed = store.list(None, None).unwrap();
    assert_eq!(
        names(&listed),
        ["Backend/a", "Backend/b"],
        "the route is gone"
    );
    assert_eq!(listed[0].resource, with_version(a1.clone(), "4"));
    assert_eq!(
        listed[1].resource,
        with_version(b.clone(), "1"),
        "unchanged"
    );
    assert_eq!(store.history().unwrap(), vec![0, 1, 2, 3, 4]);

    // The current version: nothing to do.
    assert_eq!(store.rollback(4).unwrap(), 4);
    // A set equal to the current one: nothing to do either.
    assert_eq!(store.rollback(1).unwrap(), 4);
    assert_eq!(store.version().unwrap(), 4);

    assert_eq!(store.rollback(3).unwrap(), 5);
    let listed = store.list(None, None).unwrap();
    let got: Vec<(String, u64)> = listed
        .iter()
        .map(|r| (r.key.to_string(), r.resource_version))
        .collect();
    assert_eq!(
        got,
        [
            ("Backend/a".into(), 5),
            ("Backend/b".into(), 1),
            ("GRPCRoute/r".into(), 5)
        ]
    );
    assert_eq!(listed[0].resource, with_version(a3, "5"));
    assert_eq!(listed[2].resource, with_version(r, "5"));

    // Back to the empty set of version 0.
    assert_eq!(store.rollback(0).unwrap(), 6);
    assert_eq!(store.snapshot().unwrap(), (6, vec![]));

    assert!(matches!(
        store.rollback(99),
        Err(StoreError::UnknownVersion(99))
    ));
    assert_eq!(store.version().unwrap(), 6);
}

#[test]
fn concurrent_writers_lose_no_update() {
    let t = TempStore::new("concurrent");
    let store = Arc::new(t.open());
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let b = backend("default", &format!("b{i}"), &format!("10.0.0.{i}:80"));
                store.apply(vec![b]).unwrap().version
            })
        })
        .collect();
    let mut versions: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    versions.sort_unstable();
    assert_eq!(versions, [1, 2, 3, 4]);
    assert_eq!(store.list(None, None).unwrap().len(), threads);
}

#[test]
fn everything_survives_dropping_the_store_without_shutdown() {
    let t = TempStore::new("reopen");
    let (listed, secret) = {
        let store = t.open();
        store
            .apply(vec![
                backend("default", "a", "10.0.0.1:80"),
                backend("team-a", "b", "10.0.0.2:80"),
            ])
            .unwrap();
        store.delete(&key(Kind::Backend, "team-a", "b")).unwrap();
        let (_, secret) = store
            .create_token(
                "spiffe://pylon.local/ns/default/sa/a",
                Duration::from_secs(60),
                false,
                SystemTime::now(),
            )
            .unwrap();
        (store.list(None, None).unwrap(), secret)
    };
    let store = t.open();
    assert_eq!(store.version().unwrap(), 2);
    assert_eq!(store.history().unwrap(), vec![0, 1, 2]);
    assert_eq!(store.list(None, None).unwrap(), listed);
    assert!(
        store
            .verify_token(&secret, SystemTime::now())
            .unwrap()
            .is_some()
    );
    // And the reopened store keeps counting from where it was.
    assert_eq!(store.delete(&backend_key("a")).unwrap(), 3);
}

#[test]
fn a_file_in_use_is_refused() {
    let t = TempStore::new("locked");
    let _store = t.open();
    let err = Store::open(&t.path, 10).err().expect("second open refused");
    assert!(matches!(err, StoreError::Db(_)), "{err:?}");
}

#[test]
fn a_file_with_another_schema_is_refused() {
    let t = TempStore::new("schema");
    drop(t.open());
    {
        let db = redb::Database::create(&t.path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(SCHEMA_KEY, 99)
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(&t.path, 10).err().expect("refused");
    assert!(err.to_string().contains("schema 99"), "{err}");
}

#[test]
fn resource_keys_print_and_store_as_documented() {
    let k = key(Kind::GrpcRoute, "default", "r");
    assert_eq!(k.to_string(), "GRPCRoute/r");
    assert_eq!(k.storage_key(), "GRPCRoute/default/r");
    let k = key(Kind::BackendTrafficPolicy, "team-a", "a.b");
    assert_eq!(k.to_string(), "BackendTrafficPolicy/team-a/a.b");
    assert_eq!(ResourceKey::from_storage_key(&k.storage_key()), Some(k));
    assert_eq!(ResourceKey::from_storage_key("backend/default/a"), None);
    assert_eq!(ResourceKey::from_storage_key("Backend/default"), None);
}

const CHILD_PATH_ENV: &str = "PYLON_STORE_TEST_CHILD_PATH";
const CHILD_TEST: &str = "store::tests::child_writes_and_waits_to_be_killed";
const WRITTEN: &str = "<<written ";

/// The child process of `a_store_survives_kill_9`: writes, reports, waits.
#[test]
#[ignore = "run as a child process by a_store_survives_kill_9"]
fn child_writes_and_waits_to_be_killed() {
    let Ok(path) = std::env::var(CHILD_PATH_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&path), 10).expect("open");
    store
        .apply(vec![
            backend("default", "a", "10.0.0.1:80"),
            route("r", &["a"]),
        ])
        .expect("apply");
    store
        .apply(vec![backend("default", "a", "10.0.0.2:80")])
        .expect("apply");
    let (_, secret) = store
        .create_token(
            "spiffe://pylon.local/ns/default/sa/a",
            Duration::from_secs(3600),
            true,
            SystemTime::now(),
        )
        .expect("token");
    println!("{WRITTEN}{secret}>>");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn a_store_survives_kill_9() {
    let t = TempStore::new("kill-9");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_PATH_ENV, &t.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped");
    let secret = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let (_, rest) = line.split_once(WRITTEN)?;
            Some(rest.split_once(">>")?.0.to_string())
        });
    // SIGKILL: no destructor, no redb shutdown.
    child.kill().expect("kill child");
    child.wait().expect("reap child");
    let secret = secret.expect("the child wrote and reported");

    let store = t.open();
    assert_eq!(store.version().unwrap(), 2);
    assert_eq!(
        names(&store.list(None, None).unwrap()),
        ["Backend/a", "GRPCRoute/r"]
    );
    assert_eq!(
        got_resource(&store, "a"),
        with_version(backend("default", "a", "10.0.0.2:80"), "2")
    );
    assert_eq!(store.history().unwrap(), vec![0, 1, 2]);
    let token = store.consume_token(&secret, SystemTime::now()).unwrap();
    assert!(token.is_some_and(|t| t.used));
    store
        .apply(vec![backend("default", "b", "10.0.0.3:80")])
        .unwrap();
    assert_eq!(store.version().unwrap(), 3);
}

#[test]
fn a_new_store_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let t = TempStore::new("mode");
    let store = t.open();
    store
        .create_token(
            "spiffe://pylon.local/ns/default/sa/a",
            std::time::Duration::from_secs(60),
            false,
            std::time::SystemTime::now(),
        )
        .unwrap();
    drop(store);
    let mode = std::fs::metadata(&t.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // And it opens again, as a store.
    assert_eq!(t.open().list_tokens().unwrap().len(), 1);
}
