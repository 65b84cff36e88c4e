//! Every store test runs on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::Row;
use stead_api::{
    AppConfig, Event, HostCapacity, InstanceLogLine, InstanceState, LogStream, NewLogLine,
    ObservedInstance, RegisterRequest, RegisterResponse, TokenKind, VersionState,
};
use stead_store::testing::{postgres_store, sqlite_store};
use stead_store::{CompleteOutcome, NewVersion, Store, StoreError};

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    let (store, _dir) = stead_store::testing::sqlite_store().await;
                    super::$name(store).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    let (store, _guard) = stead_store::testing::postgres_store().await;
                    super::$name(store).await;
                }
            }
        )*
    };
}

both!(
    tokens_are_hashed_and_scoped,
    concurrent_deploys_get_distinct_numbers,
    idempotency_key_replays,
    claim_lease_expiry_and_reclaim,
    completion_activates_and_failure_records_error,
    secrets_are_encrypted_at_rest,
    heartbeat_replaces_instances,
    instance_log_retention_is_capped,
    events_are_ordered,
    rollback_rules,
    delete_cascades,
    promotion_waits_for_a_ready_instance,
    crash_looping_target_is_failed,
    rollback_goes_through_the_target,
    replicas_share_one_key_and_take_turns_with_leases,
    a_host_back_from_the_dead_is_fenced,
    draining_is_stored_and_listed,
    revision_moves_with_changes_not_with_repeated_heartbeats,
);

/// The intended state's revision moves with every change of what hosts
/// should run (made by any write path: triggers) and not with a heartbeat
/// that repeats what is stored, which writes nothing but its time; a
/// pending target is still promoted by such a heartbeat.
async fn revision_moves_with_changes_not_with_repeated_heartbeats(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    let h = store.register_host(&reg("h1")).await.unwrap();
    let app_id = serving_v1(&store, org, &h, "revs").await;
    let timeout = Duration::from_secs(30);
    let report = [inst("v1-r", "revs", 1, InstanceState::Ready)];
    let first = store
        .heartbeat_fenced(&h.host_id, &h.session, &report, timeout)
        .await
        .unwrap();
    assert!(first.changed);
    let rev = store.intended_rev().await.unwrap();
    let count_writes = |store: Store| async move {
        sqlx::query("SELECT updated_at FROM instances WHERE id = 'v1-r'")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .try_get::<i64, _>("updated_at")
            .unwrap()
    };
    let written = count_writes(store.clone()).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    // The same report, in another order of fields nothing: unchanged.
    let again = store
        .heartbeat_fenced(&h.host_id, &h.session, &report, timeout)
        .await
        .unwrap();
    assert!(
        !again.changed,
        "a repeated report must not count as a change"
    );
    assert_eq!(store.intended_rev().await.unwrap(), rev);
    assert_eq!(count_writes(store.clone()).await, written, "row rewritten");
    // A change of state is a change, and moves the revision.
    let stopping = [inst("v1-r", "revs", 1, InstanceState::Stopping)];
    let changed = store
        .heartbeat_fenced(&h.host_id, &h.session, &stopping, timeout)
        .await
        .unwrap();
    assert!(changed.changed);
    let rev2 = store.intended_rev().await.unwrap();
    assert!(rev2 > rev);
    // Scale settings, draining and env move it too; a heartbeat time does not.
    store
        .set_scale_settings(
            app_id,
            &stead_api::ScaleRequest {
                min: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rev3 = store.intended_rev().await.unwrap();
    assert!(rev3 > rev2);
    store.set_draining("h1", true).await.unwrap();
    let rev4 = store.intended_rev().await.unwrap();
    assert!(rev4 > rev3);
    let mut vars = BTreeMap::new();
    vars.insert("K".to_string(), "v".to_string());
    store.set_env(app_id, &vars, false).await.unwrap();
    assert!(store.intended_rev().await.unwrap() > rev4);
    // A target whose instance already runs ready here (a rollback) is
    // promoted by a heartbeat that reports nothing new.
    let both = [
        inst("v1-r", "revs", 1, InstanceState::Stopping),
        inst("v2-a", "revs", 2, InstanceState::Ready),
    ];
    deploy(&store, org, "revs", None).await;
    // Reported ready while version 2 is still building: nothing to promote.
    store
        .heartbeat_fenced(&h.host_id, &h.session, &both, timeout)
        .await
        .unwrap();
    assert_eq!(
        store
            .app_by_id(app_id)
            .await
            .unwrap()
            .unwrap()
            .active_version,
        Some(1)
    );
    build_next(&store, &h, Ok("art2")).await;
    let same = store
        .heartbeat_fenced(&h.host_id, &h.session, &both, timeout)
        .await
        .unwrap();
    assert!(same.changed, "promoting the target is a change");
    assert_eq!(
        store
            .app_by_id(app_id)
            .await
            .unwrap()
            .unwrap()
            .active_version,
        Some(2)
    );
}

/// Replicas on one database: the first fixes the secret key's check value
/// and a replica with another key is refused; a lease is held by one
/// replica at a time, renewed by its holder, taken over only once expired,
/// and free at once when released.
async fn replicas_share_one_key_and_take_turns_with_leases(store: Store) {
    store.check_secret_key().await.unwrap();
    store.check_secret_key().await.unwrap();
    let other = store.clone().with_secret_key([7u8; 32]);
    let e = other.check_secret_key().await.unwrap_err();
    assert!(matches!(e, StoreError::KeyMismatch), "{e}");
    assert!(e.to_string().contains("--secret-key-file"), "{e}");

    let ttl = Duration::from_secs(30);
    assert!(store.acquire_lease("loop", "r-a", ttl).await.unwrap());
    assert!(!store.acquire_lease("loop", "r-b", ttl).await.unwrap());
    assert!(
        store.acquire_lease("loop", "r-a", ttl).await.unwrap(),
        "renewal"
    );
    assert_eq!(
        store.lease_holder("loop").await.unwrap().map(|(h, _)| h),
        Some("r-a".to_string())
    );
    // Concurrent takers of a free lease: exactly one wins.
    let mut wins = 0;
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move { s.acquire_lease("race", &format!("r-{i}"), ttl).await })
        })
        .collect();
    for r in racers {
        if r.await.unwrap().unwrap() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    // An expired lease is taken over.
    assert!(store
        .acquire_lease("loop", "r-a", Duration::from_millis(1))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.lease_holder("loop").await.unwrap(), None);
    assert!(store.acquire_lease("loop", "r-b", ttl).await.unwrap());
    assert!(!store.acquire_lease("loop", "r-a", ttl).await.unwrap());
    // Released: free at once; releasing someone else's lease does nothing.
    store.release_lease("loop", "r-a").await.unwrap();
    assert!(!store.acquire_lease("loop", "r-a", ttl).await.unwrap());
    store.release_lease("loop", "r-b").await.unwrap();
    assert!(store.acquire_lease("loop", "r-a", ttl).await.unwrap());
    store.notify("stead_test", "hello").await.unwrap();
}

fn config(name: &str) -> AppConfig {
    AppConfig::from_stead_toml(&format!(
        "name = \"{name}\"\n[run]\nstart = \"./run\"\nport = 8080\n"
    ))
    .unwrap()
}

async fn deploy(
    store: &Store,
    org_id: i64,
    name: &str,
    key: Option<&str>,
) -> stead_api::DeployResponse {
    store.put_blob("b1", b"bundle").await.unwrap();
    store
        .create_version(&NewVersion {
            org_id,
            bundle_hash: "b1".into(),
            bundle_size: 6,
            config: config(name),
            idempotency_key: key.map(String::from),
            hold: false,
        })
        .await
        .unwrap()
        .response
}

async fn org_of(store: &Store, token: &str) -> i64 {
    store
        .authenticate(token)
        .await
        .unwrap()
        .unwrap()
        .org_id
        .unwrap()
}

async fn tokens_are_hashed_and_scoped(store: Store) {
    let a = store.create_user_token("acme", "ann").await.unwrap();
    let b = store.create_user_token("globex", "bob").await.unwrap();
    let a2 = store.create_user_token("acme", "al").await.unwrap();
    let host = store.create_host_token().await.unwrap();
    assert!(a.starts_with("stead_") && a.len() == 49);

    let pa = store.authenticate(&a).await.unwrap().unwrap();
    assert_eq!(pa.kind, TokenKind::User);
    assert_eq!(pa.org.as_deref(), Some("acme"));
    assert_eq!(pa.user.as_deref(), Some("ann"));
    assert_eq!(pa.org_id, Some(org_of(&store, &a2).await));
    let ph = store.authenticate(&host).await.unwrap().unwrap();
    assert_eq!(ph.kind, TokenKind::Host);
    assert!(ph.org_id.is_none());
    assert!(store.authenticate("stead_unknown").await.unwrap().is_none());

    // Only hashes at rest.
    let rows = sqlx::query("SELECT hash FROM tokens")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    for r in rows {
        let h: String = r.try_get("hash").unwrap();
        for t in [&a, &b, &a2, &host] {
            assert!(!h.contains(t.as_str()) && !h.contains(&t[6..]));
        }
    }

    // A foreign org cannot see the app.
    let acme = pa.org_id.unwrap();
    let globex = org_of(&store, &b).await;
    deploy(&store, acme, "shop", None).await;
    assert!(store.get_app(acme, "shop").await.unwrap().is_some());
    assert!(store.get_app(globex, "shop").await.unwrap().is_none());
    assert!(store.list_apps(globex).await.unwrap().is_empty());
    assert_eq!(store.list_apps(acme).await.unwrap().len(), 1);
    assert!(!store.delete_app(globex, "shop").await.unwrap());
    // Nor take its name.
    let err = store
        .create_version(&NewVersion {
            org_id: globex,
            bundle_hash: "b1".into(),
            bundle_size: 6,
            config: config("shop"),
            idempotency_key: None,
            hold: false,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NameTaken(_)), "{err}");
    assert!(store.revoke_token(&b).await.unwrap());
    assert!(store.authenticate(&b).await.unwrap().is_none());
}

async fn concurrent_deploys_get_distinct_numbers(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    store.put_blob("b1", b"bundle").await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..12 {
        let s = store.clone();
        handles.push(tokio::spawn(async move {
            s.create_version(&NewVersion {
                org_id: org,
                bundle_hash: "b1".into(),
                bundle_size: 6,
                config: config("race"),
                idempotency_key: None,
                hold: false,
            })
            .await
            .map(|o| o.response.version)
        }));
    }
    let mut numbers = Vec::new();
    for h in handles {
        numbers.push(h.await.unwrap().unwrap());
    }
    numbers.sort();
    assert_eq!(numbers, (1..=12).collect::<Vec<u32>>());
    let app = store.get_app(org, "race").await.unwrap().unwrap();
    assert_eq!(app.latest_version, Some(12));
    assert_eq!(store.list_versions(app.id).await.unwrap().len(), 12);
}

async fn idempotency_key_replays(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    let first = deploy(&store, org, "idem", Some("k1")).await;
    assert!(!first.replayed);
    let again = deploy(&store, org, "idem", Some("k1")).await;
    assert!(again.replayed);
    assert_eq!(
        (again.version, again.build_id),
        (first.version, first.build_id)
    );
    assert_eq!(
        store
            .find_deploy_key(org, "k1")
            .await
            .unwrap()
            .unwrap()
            .version,
        first.version
    );
    let other = deploy(&store, org, "idem", Some("k2")).await;
    assert_eq!(other.version, first.version + 1);
    // The key is per organisation.
    let t2 = store.create_user_token("globex", "bob").await.unwrap();
    assert!(store
        .find_deploy_key(org_of(&store, &t2).await, "k1")
        .await
        .unwrap()
        .is_none());
    let app = store.get_app(org, "idem").await.unwrap().unwrap();
    assert_eq!(store.list_versions(app.id).await.unwrap().len(), 2);
}

fn reg(name: &str) -> RegisterRequest {
    RegisterRequest {
        name: name.into(),
        capacity: HostCapacity {
            memory_mb: 1024,
            cpus: 2,
        },
        backends: vec!["process".into()],
        agent_version: "test".into(),
    }
}

async fn claim_lease_expiry_and_reclaim(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    let d = deploy(&store, org, "build", None).await;
    let h1 = store.register_host(&reg("h1")).await.unwrap();
    let h2 = store.register_host(&reg("h2")).await.unwrap();

    let task = store
        .claim_build(&h1.host_id, &h1.session, Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (task.id, task.version, task.attempt),
        (d.build_id, d.version, 1)
    );
    assert_eq!(task.config.start, "./run");
    // Held: nobody else gets it.
    assert!(store
        .claim_build(&h2.host_id, &h2.session, Duration::from_secs(30))
        .await
        .unwrap()
        .is_none());
    store
        .renew_build(
            task.id,
            &h1.host_id,
            &h1.session,
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    let err = store
        .renew_build(task.id, &h2.host_id, &h2.session, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");

    // Expired: another host takes it over and the first loses it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t2 = store
        .claim_build(&h2.host_id, &h2.session, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((t2.id, t2.attempt), (task.id, 2));
    assert!(store
        .renew_build(task.id, &h1.host_id, &h1.session, Duration::from_secs(1))
        .await
        .is_err());
    assert!(store
        .append_build_log(task.id, &h1.host_id, &h1.session, &[line("stale")])
        .await
        .is_err());

    // A new session of the same host reclaims at once, lease or not.
    let h2b = store.register_host(&reg("h2")).await.unwrap();
    assert_eq!(h2b.host_id, h2.host_id);
    assert_ne!(h2b.session, h2.session);
    let t3 = store
        .claim_build(&h2b.host_id, &h2b.session, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((t3.id, t3.attempt), (task.id, 3));
    // Old session's completion is refused.
    let err = store
        .complete_build(task.id, &h2.host_id, &h2.session, Err("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
}

fn line(s: &str) -> NewLogLine {
    NewLogLine {
        ts_ms: 1,
        stream: LogStream::Stdout,
        line: s.into(),
    }
}

async fn completion_activates_and_failure_records_error(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    let v1 = deploy(&store, org, "comp", None).await;
    let v2 = deploy(&store, org, "comp", None).await;
    let h = store.register_host(&reg("h1")).await.unwrap();
    let app = store.get_app(org, "comp").await.unwrap().unwrap();

    let a = store
        .claim_build(&h.host_id, &h.session, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.id, v1.build_id);
    store
        .append_build_log(a.id, &h.host_id, &h.session, &[line("one"), line("two")])
        .await
        .unwrap();
    store
        .append_build_log(a.id, &h.host_id, &h.session, &[line("three")])
        .await
        .unwrap();
    let log = store.build_log(app.id, 1, 0, 100).await.unwrap();
    assert_eq!(log.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(
        store.build_log(app.id, 1, 2, 100).await.unwrap()[0].line,
        "three"
    );

    // Missing artifact is refused and changes nothing.
    let err = store
        .complete_build(a.id, &h.host_id, &h.session, Ok("nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    store.put_blob("art1", b"artifact").await.unwrap();
    let out = store
        .complete_build(a.id, &h.host_id, &h.session, Ok("art1"))
        .await
        .unwrap();
    assert_eq!(out, CompleteOutcome::Succeeded { activated: true });
    assert_eq!(
        store
            .complete_build(a.id, &h.host_id, &h.session, Ok("art1"))
            .await
            .unwrap(),
        CompleteOutcome::AlreadyDone
    );
    // A successful build makes the version the target, not yet active.
    let app = store.get_app(org, "comp").await.unwrap().unwrap();
    assert_eq!((app.active_version, app.target_version), (None, Some(1)));
    let ver = store.get_version(app.id, 1).await.unwrap().unwrap();
    assert_eq!(ver.state, VersionState::Ready);
    assert!(!ver.active);
    assert_eq!(ver.artifact_hash.as_deref(), Some("art1"));
    let promoting = events_of(&store, app.id, "promoting").await;
    assert_eq!(promoting.len(), 1);
    assert_eq!(promoting[0].data["version"], 1);
    // The target is to be run; a ready instance of it makes it active.
    assert_eq!(active_versions(&store, "comp").await, vec![1]);
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[inst("c1", "comp", 1, InstanceState::Ready)],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "comp").await, (Some(1), None));
    assert!(store.get_version(app.id, 1).await.unwrap().unwrap().active);

    let b = store
        .claim_build(&h.host_id, &h.session, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.id, v2.build_id);
    assert_eq!(
        store
            .complete_build(b.id, &h.host_id, &h.session, Err("npm ERR! missing script"))
            .await
            .unwrap(),
        CompleteOutcome::Failed
    );
    let ver = store.get_version(app.id, 2).await.unwrap().unwrap();
    assert_eq!(ver.state, VersionState::Failed);
    assert_eq!(ver.error.as_deref(), Some("npm ERR! missing script"));
    // A failed build never becomes the target.
    assert_eq!(versions_of(&store, org, "comp").await, (Some(1), None));
    assert_eq!(
        store.build_state(b.id).await.unwrap().as_deref(),
        Some("failed")
    );
    let active = store.active_apps().await.unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(
        (active[0].version, active[0].artifact_hash.as_str()),
        (1, "art1")
    );
}

async fn secrets_are_encrypted_at_rest(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    deploy(&store, org, "envy", None).await;
    let app = store.get_app(org, "envy").await.unwrap().unwrap();
    let secret = "postgres://user:verysecretpassword@db/x";
    store
        .set_env(
            app.id,
            &BTreeMap::from([("DATABASE_URL".to_string(), secret.to_string())]),
            true,
        )
        .await
        .unwrap();
    store
        .set_env(
            app.id,
            &BTreeMap::from([("MODE".to_string(), "prod".to_string())]),
            false,
        )
        .await
        .unwrap();
    let row = sqlx::query("SELECT value, ciphertext FROM env_vars WHERE key = 'DATABASE_URL'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let value: Option<String> = row.try_get("value").unwrap();
    let ct: Option<Vec<u8>> = row.try_get("ciphertext").unwrap();
    assert!(value.is_none());
    let ct = ct.unwrap();
    assert_ne!(ct, secret.as_bytes());
    assert!(!String::from_utf8_lossy(&ct).contains("verysecret"));

    let listed = store.list_env(app.id).await.unwrap();
    assert_eq!(listed.len(), 2);
    let db = listed.iter().find(|v| v.key == "DATABASE_URL").unwrap();
    assert!(db.secret);
    assert!(!db.value.contains("verysecret"), "{}", db.value);
    assert_eq!(
        listed.iter().find(|v| v.key == "MODE").unwrap().value,
        "prod"
    );
    let plain = store.env_plain(app.id).await.unwrap();
    assert_eq!(plain["DATABASE_URL"], secret);
    assert_eq!(plain["MODE"], "prod");

    // The wrong key cannot read it.
    let other = store.clone().with_secret_key([1u8; 32]);
    assert!(matches!(
        other.env_plain(app.id).await.unwrap_err(),
        StoreError::Decrypt { .. }
    ));

    assert!(store.unset_env(app.id, "MODE").await.unwrap());
    assert!(!store.unset_env(app.id, "MODE").await.unwrap());
    assert_eq!(store.list_env(app.id).await.unwrap().len(), 1);
}

fn observed(id: &str, app: &str, state: InstanceState) -> ObservedInstance {
    ObservedInstance {
        id: id.into(),
        app: app.into(),
        version: 1,
        state,
        executor_id: format!("exec-{id}"),
        endpoint: Some(format!("127.0.0.1:{}", 9000 + id.len())),
        pid: Some(42),
        started_at_ms: 5,
        exit: (state == InstanceState::Exited).then(|| "exit status 1".to_string()),
        dbos_admin: false,
    }
}

/// An instance of `version` of `app`; exited ones exit with status 1.
fn inst(id: &str, app: &str, version: u32, state: InstanceState) -> ObservedInstance {
    ObservedInstance {
        version,
        ..observed(id, app, state)
    }
}

/// An instance of `version` of `app` that exited for `why`.
fn exited(id: &str, app: &str, version: u32, why: &str) -> ObservedInstance {
    ObservedInstance {
        exit: Some(why.to_string()),
        ..inst(id, app, version, InstanceState::Exited)
    }
}

/// Claims the next build on `h` and completes it with `result`
/// (an `Ok` artifact is uploaded first); returns the version and outcome.
async fn build_next(
    store: &Store,
    h: &RegisterResponse,
    result: std::result::Result<&str, &str>,
) -> (u32, CompleteOutcome) {
    if let Ok(artifact) = result {
        store.put_blob(artifact, b"artifact").await.unwrap();
    }
    let task = store
        .claim_build(&h.host_id, &h.session, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("a build to claim");
    let out = store
        .complete_build(task.id, &h.host_id, &h.session, result)
        .await
        .unwrap();
    (task.version, out)
}

/// (active, target) versions of an app.
async fn versions_of(store: &Store, org: i64, name: &str) -> (Option<u32>, Option<u32>) {
    let app = store.get_app(org, name).await.unwrap().unwrap();
    (app.active_version, app.target_version)
}

/// The versions of `name` that agents are asked to run.
async fn active_versions(store: &Store, name: &str) -> Vec<u32> {
    store
        .active_apps()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.name == name)
        .map(|a| a.version)
        .collect()
}

/// The version routed to and its instances, sorted.
async fn route_of(store: &Store, name: &str) -> (Option<u32>, Vec<String>) {
    let routes = store.routes(Duration::from_secs(30)).await.unwrap();
    let r = routes
        .apps
        .into_iter()
        .find(|a| a.app == name)
        .expect("the app in the route table");
    let mut eps: Vec<String> = r.endpoints.into_iter().map(|e| e.instance).collect();
    eps.sort();
    (r.version, eps)
}

/// Events of one kind.
async fn events_of(store: &Store, app_id: i64, kind: &str) -> Vec<Event> {
    store
        .events(app_id, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == kind)
        .collect()
}

/// (exits, ever_ready) of a version, straight from its row.
async fn start_record(store: &Store, app_id: i64, version: u32) -> (i64, i64) {
    let row =
        sqlx::query("SELECT exits, ever_ready FROM versions WHERE app_id = $1 AND number = $2")
            .bind(app_id)
            .bind(i64::from(version))
            .fetch_one(store.pool())
            .await
            .unwrap();
    (
        row.try_get("exits").unwrap(),
        row.try_get("ever_ready").unwrap(),
    )
}

async fn heartbeat_replaces_instances(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    deploy(&store, org, "beat", None).await;
    let app = store.get_app(org, "beat").await.unwrap().unwrap();
    let h = store.register_host(&reg("h1")).await.unwrap();
    let h2 = store.register_host(&reg("h2")).await.unwrap();
    // Version 1 is built, so it is the target and its first ready instance
    // (on h2) makes it active.
    assert_eq!(
        build_next(&store, &h, Ok("art")).await,
        (1, CompleteOutcome::Succeeded { activated: true })
    );
    store
        .heartbeat(
            &h2.host_id,
            &h2.session,
            &[observed("other", "beat", InstanceState::Ready)],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "beat").await, (Some(1), None));

    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                observed("i1", "beat", InstanceState::Starting),
                observed("i2", "beat", InstanceState::Ready),
            ],
        )
        .await
        .unwrap();
    assert_eq!(store.app_instances(app.id).await.unwrap().len(), 3);
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                observed("i1", "beat", InstanceState::Ready),
                observed("i3", "beat", InstanceState::Exited),
            ],
        )
        .await
        .unwrap();
    let mut inst = store.app_instances(app.id).await.unwrap();
    inst.sort_by(|a, b| a.id.cmp(&b.id));
    let ids: Vec<&str> = inst.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, vec!["i1", "i3", "other"]);
    assert_eq!(inst[0].state, InstanceState::Ready);
    assert_eq!(inst[0].host, "h1");
    assert_eq!(inst[1].exit.as_deref(), Some("exit status 1"));

    let events = store.events(app.id, 0, 100).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    // other ready (activating version 1), i2 ready, i1 ready, i3 exited.
    assert_eq!(
        kinds,
        vec![
            "deploy",
            "build_started",
            "build_succeeded",
            "promoting",
            "instance_ready",
            "activated",
            "instance_ready",
            "instance_ready",
            "instance_exited"
        ]
    );
    // An exit of a version that has been ready is not a start failure.
    assert_eq!(start_record(&store, app.id, 1).await, (0, 1));

    // A stale session is refused; an unknown host is not found.
    assert!(matches!(
        store.heartbeat(&h.host_id, "s-old", &[]).await.unwrap_err(),
        StoreError::Conflict(_)
    ));
    assert!(matches!(
        store.heartbeat("h-nope", "s", &[]).await.unwrap_err(),
        StoreError::NotFound(_)
    ));

    let hosts = store.list_hosts(Duration::from_secs(30)).await.unwrap();
    assert_eq!(hosts.len(), 2);
    assert!(hosts.iter().all(|h| h.state == "alive"));
    assert_eq!(hosts.iter().find(|x| x.name == "h1").unwrap().instances, 1);
    assert_eq!(
        store
            .alive_host_ids(Duration::from_secs(30))
            .await
            .unwrap()
            .len(),
        2
    );

    // Routes: only ready instances of the active version on alive hosts.
    let routes = store.routes(Duration::from_secs(30)).await.unwrap();
    assert_eq!(routes.apps.len(), 1);
    assert_eq!(routes.apps[0].version, Some(1));
    let mut eps: Vec<String> = routes.apps[0]
        .endpoints
        .iter()
        .map(|e| e.instance.clone())
        .collect();
    eps.sort();
    assert_eq!(eps, vec!["i1", "other"]);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let routes = store.routes(Duration::from_millis(1)).await.unwrap();
    assert!(routes.apps[0].endpoints.is_empty());

    // Empty report clears the host's rows.
    store.heartbeat(&h.host_id, &h.session, &[]).await.unwrap();
    assert_eq!(store.app_instances(app.id).await.unwrap().len(), 1);
}

async fn a_host_back_from_the_dead_is_fenced(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    let h = store.register_host(&reg("h1")).await.unwrap();
    let app_id = serving_v1(&store, org, &h, "fence").await;
    let timeout = Duration::from_millis(300);
    // Heartbeats within the timeout fence nothing.
    store
        .heartbeat_fenced(
            &h.host_id,
            &h.session,
            &[inst("v1-a", "fence", 1, InstanceState::Ready)],
            timeout,
        )
        .await
        .unwrap();
    let p = store.placement_inputs(timeout).await.unwrap();
    assert_eq!(p.hosts.len(), 1);
    assert_eq!(p.instances.len(), 1);
    assert!(!p.instances[0].fenced);
    assert_eq!(p.instances[0].memory_mb, 256);
    // The host is silent past the timeout (the clock, not a wait for an
    // event): dead, so placement sees neither it nor its instances.
    tokio::time::sleep(timeout + Duration::from_millis(100)).await;
    let p = store.placement_inputs(timeout).await.unwrap();
    assert!(p.hosts.is_empty() && p.instances.is_empty());
    // It comes back with its old instance and one it started meanwhile:
    // both are fenced, neither routed nor listed, the host counts them.
    store
        .heartbeat_fenced(
            &h.host_id,
            &h.session,
            &[
                inst("v1-a", "fence", 1, InstanceState::Ready),
                inst("v1-b", "fence", 1, InstanceState::Ready),
            ],
            timeout,
        )
        .await
        .unwrap();
    let p = store.placement_inputs(timeout).await.unwrap();
    assert_eq!(p.instances.len(), 2);
    assert!(p.instances.iter().all(|i| i.fenced), "{:?}", p.instances);
    assert_eq!(route_of(&store, "fence").await, (Some(1), vec![]));
    assert!(store.app_instances(app_id).await.unwrap().is_empty());
    let hosts = store.list_hosts(timeout).await.unwrap();
    assert_eq!((hosts[0].instances, hosts[0].fenced), (0, 2));
    assert_eq!(events_of(&store, app_id, "instance_fenced").await.len(), 2);
    // A new instance after the revival is not fenced; the stale ones stay
    // fenced in later heartbeats until they are gone.
    store
        .heartbeat_fenced(
            &h.host_id,
            &h.session,
            &[
                inst("v1-a", "fence", 1, InstanceState::Stopping),
                inst("v1-c", "fence", 1, InstanceState::Ready),
            ],
            timeout,
        )
        .await
        .unwrap();
    let p = store.placement_inputs(timeout).await.unwrap();
    let fenced: Vec<(&str, bool)> = p
        .instances
        .iter()
        .map(|i| (i.id.as_str(), i.fenced))
        .collect();
    assert_eq!(fenced, vec![("v1-a", true), ("v1-c", false)]);
    assert_eq!(
        route_of(&store, "fence").await,
        (Some(1), vec!["v1-c".into()])
    );
    // Re-registering after a death fences too: the first heartbeat of the
    // new session is the one that brings the host back.
    tokio::time::sleep(timeout + Duration::from_millis(100)).await;
    let h2 = store.register_host(&reg("h1")).await.unwrap();
    assert_eq!(h2.host_id, h.host_id);
    assert!(store
        .placement_inputs(timeout)
        .await
        .unwrap()
        .hosts
        .is_empty());
    store
        .heartbeat_fenced(
            &h2.host_id,
            &h2.session,
            &[inst("v1-c", "fence", 1, InstanceState::Ready)],
            timeout,
        )
        .await
        .unwrap();
    let p = store.placement_inputs(timeout).await.unwrap();
    assert_eq!(p.instances.len(), 1);
    assert!(p.instances[0].fenced);
}

async fn draining_is_stored_and_listed(store: Store) {
    let h = store.register_host(&reg("d1")).await.unwrap();
    store.heartbeat(&h.host_id, &h.session, &[]).await.unwrap();
    let t = Duration::from_secs(30);
    assert_eq!(store.list_hosts(t).await.unwrap()[0].state, "alive");
    assert_eq!(
        store.set_draining("d1", true).await.unwrap().as_deref(),
        Some("d1")
    );
    let hosts = store.list_hosts(t).await.unwrap();
    assert_eq!(
        (hosts[0].state.as_str(), hosts[0].draining),
        ("draining", true)
    );
    assert!(store.placement_inputs(t).await.unwrap().hosts[0].draining);
    // By id too; unknown hosts are None.
    assert!(store
        .set_draining(&h.host_id, false)
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.list_hosts(t).await.unwrap()[0].state, "alive");
    assert!(store.set_draining("nope", true).await.unwrap().is_none());
    // A dead host is dead, drained or not.
    store.set_draining("d1", true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let hosts = store.list_hosts(Duration::from_millis(1)).await.unwrap();
    assert_eq!(hosts[0].state, "dead");
}

async fn instance_log_retention_is_capped(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    deploy(&store, org, "chatty", None).await;
    let app = store.get_app(org, "chatty").await.unwrap().unwrap();
    let mk = |i: usize| InstanceLogLine {
        app: "chatty".into(),
        version: 1,
        instance: "i1".into(),
        ts_ms: i as i64,
        stream: LogStream::Stdout,
        line: format!("line {i}"),
    };
    let batch: Vec<_> = (0..30).map(mk).collect();
    store
        .append_instance_logs_capped("h1", &batch, 25)
        .await
        .unwrap();
    let batch: Vec<_> = (30..40).map(mk).collect();
    store
        .append_instance_logs_capped("h1", &batch, 25)
        .await
        .unwrap();
    // Lines of unknown apps are dropped, not errors.
    let ghost = InstanceLogLine {
        app: "ghost".into(),
        ..mk(0)
    };
    assert_eq!(store.append_instance_logs("h1", &[ghost]).await.unwrap(), 0);

    let all = store.instance_logs_after(app.id, 0, 1000).await.unwrap();
    assert_eq!(all.len(), 25);
    assert_eq!(all[0].line, "line 15");
    assert_eq!(all[24].line, "line 39");
    assert_eq!(all[24].host, "h1");
    let tail = store.instance_logs_tail(app.id, 3).await.unwrap();
    assert_eq!(
        tail.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
        vec!["line 37", "line 38", "line 39"]
    );
    let after = store
        .instance_logs_after(app.id, tail[0].seq, 10)
        .await
        .unwrap();
    assert_eq!(after.len(), 2);
}

async fn events_are_ordered(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    deploy(&store, org, "evts", None).await;
    let app_id = store.get_app(org, "evts").await.unwrap().unwrap().id;
    let mut handles = Vec::new();
    for i in 0..10 {
        let s = store.clone();
        handles.push(tokio::spawn(async move {
            s.record_event(
                app_id,
                "note",
                &format!("n{i}"),
                serde_json::json!({"i": i}),
            )
            .await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let events = store.events(app_id, 0, 100).await.unwrap();
    assert_eq!(events.len(), 11);
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=11).collect::<Vec<i64>>()
    );
    assert_eq!(events[0].kind, "deploy");
    assert_eq!(events[0].data["version"], 1);
    let later = store.events(app_id, 9, 100).await.unwrap();
    assert_eq!(later.len(), 2);
}

async fn rollback_rules(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    let h = store.register_host(&reg("h1")).await.unwrap();
    for _ in 0..3 {
        deploy(&store, org, "roll", None).await;
    }
    let app = store.get_app(org, "roll").await.unwrap().unwrap();
    // v1 ready, v2 failed, v3 ready; v3 is the target, nothing active yet.
    assert_eq!(
        build_next(&store, &h, Ok("art")).await,
        (1, CompleteOutcome::Succeeded { activated: true })
    );
    assert_eq!(
        build_next(&store, &h, Err("boom")).await,
        (2, CompleteOutcome::Failed)
    );
    assert_eq!(
        build_next(&store, &h, Ok("art")).await,
        (3, CompleteOutcome::Succeeded { activated: true })
    );
    assert_eq!(versions_of(&store, org, "roll").await, (None, Some(3)));
    // Without an active version there is nothing to roll back from.
    let err = store.rollback(app.id, None).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(_)) && err.to_string().contains("no active version"),
        "{err}"
    );
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[inst("r3", "roll", 3, InstanceState::Ready)],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "roll").await, (Some(3), None));

    let err = store.rollback(app.id, Some(2)).await.unwrap_err();
    assert!(
        err.to_string().contains("failed") && err.to_string().contains("boom"),
        "{err}"
    );
    assert!(matches!(
        store.rollback(app.id, Some(9)).await.unwrap_err(),
        StoreError::NotFound(_)
    ));
    // Refusals change nothing.
    assert_eq!(versions_of(&store, org, "roll").await, (Some(3), None));
    // Default skips the failed one; it only becomes the target.
    assert_eq!(store.rollback(app.id, None).await.unwrap(), 1);
    assert_eq!(versions_of(&store, org, "roll").await, (Some(3), Some(1)));
    // Until an instance of it is ready, the default is still taken from
    // the active version.
    assert_eq!(store.rollback(app.id, None).await.unwrap(), 1);
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                inst("r3", "roll", 3, InstanceState::Ready),
                inst("r1", "roll", 1, InstanceState::Ready),
            ],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "roll").await, (Some(1), None));
    // Nothing ready below version 1.
    assert!(matches!(
        store.rollback(app.id, None).await.unwrap_err(),
        StoreError::Invalid(_)
    ));
    assert_eq!(store.rollback(app.id, Some(3)).await.unwrap(), 3);
    assert_eq!(versions_of(&store, org, "roll").await, (Some(1), Some(3)));
    let rollbacks = events_of(&store, app.id, "rollback").await;
    assert_eq!(rollbacks.len(), 3);
    assert_eq!(rollbacks[0].data["version"], 1);
    assert_eq!(rollbacks[0].data["previous"], 3);
    assert_eq!(rollbacks[2].data["version"], 3);
    assert_eq!(rollbacks[2].data["previous"], 1);
}

async fn delete_cascades(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    deploy(&store, org, "gone", Some("key")).await;
    let app = store.get_app(org, "gone").await.unwrap().unwrap();
    store
        .set_env(
            app.id,
            &BTreeMap::from([("A".to_string(), "b".to_string())]),
            false,
        )
        .await
        .unwrap();
    assert!(store.delete_app(org, "gone").await.unwrap());
    assert!(store.get_app(org, "gone").await.unwrap().is_none());
    for table in [
        "versions",
        "build_tasks",
        "env_vars",
        "events",
        "deploy_keys",
    ] {
        let n: i64 = sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table}"))
            .fetch_one(store.pool())
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
        assert_eq!(n, 0, "{table} not emptied");
    }
    // The name is free again and numbering restarts.
    assert_eq!(deploy(&store, org, "gone", Some("key")).await.version, 1);
}

/// An app `name` whose version 1 is active with instance `v1-a` ready on `h`.
async fn serving_v1(store: &Store, org: i64, h: &RegisterResponse, name: &str) -> i64 {
    deploy(store, org, name, None).await;
    build_next(store, h, Ok("art1")).await;
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[inst("v1-a", name, 1, InstanceState::Ready)],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(store, org, name).await, (Some(1), None));
    assert_eq!(route_of(store, name).await, (Some(1), vec!["v1-a".into()]));
    store.get_app(org, name).await.unwrap().unwrap().id
}

async fn promotion_waits_for_a_ready_instance(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    let h = store.register_host(&reg("h1")).await.unwrap();
    let app_id = serving_v1(&store, org, &h, "promo").await;
    let activated = events_of(&store, app_id, "activated").await;
    assert_eq!(activated.len(), 1);
    assert_eq!(activated[0].data["version"], 1);

    // Version 2 is built: it becomes the target and runs beside version 1,
    // which keeps the traffic.
    deploy(&store, org, "promo", None).await;
    assert_eq!(
        build_next(&store, &h, Ok("art2")).await,
        (2, CompleteOutcome::Succeeded { activated: true })
    );
    assert_eq!(versions_of(&store, org, "promo").await, (Some(1), Some(2)));
    let v2 = store.get_version(app_id, 2).await.unwrap().unwrap();
    assert_eq!(v2.state, VersionState::Ready);
    assert!(!v2.active);
    assert!(store.get_version(app_id, 1).await.unwrap().unwrap().active);
    let active = store.active_apps().await.unwrap();
    assert_eq!(
        active
            .iter()
            .map(|a| (a.name.as_str(), a.version, a.artifact_hash.as_str()))
            .collect::<Vec<_>>(),
        vec![("promo", 1, "art1"), ("promo", 2, "art2")]
    );
    assert_eq!(
        route_of(&store, "promo").await,
        (Some(1), vec!["v1-a".into()])
    );
    let promoting = events_of(&store, app_id, "promoting").await;
    assert_eq!(promoting.len(), 2);
    assert_eq!(promoting[1].data["version"], 2);

    // Starting is not enough.
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                inst("v1-a", "promo", 1, InstanceState::Ready),
                inst("v2-a", "promo", 2, InstanceState::Starting),
            ],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "promo").await, (Some(1), Some(2)));
    assert_eq!(
        route_of(&store, "promo").await,
        (Some(1), vec!["v1-a".into()])
    );
    assert_eq!(start_record(&store, app_id, 2).await, (0, 0));

    // Ready: version 2 is active and gets the traffic; version 1 is no
    // longer to be run.
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                inst("v1-a", "promo", 1, InstanceState::Ready),
                inst("v2-a", "promo", 2, InstanceState::Ready),
            ],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "promo").await, (Some(2), None));
    assert_eq!(
        route_of(&store, "promo").await,
        (Some(2), vec!["v2-a".into()])
    );
    assert_eq!(active_versions(&store, "promo").await, vec![2]);
    assert!(store.get_version(app_id, 2).await.unwrap().unwrap().active);
    assert!(!store.get_version(app_id, 1).await.unwrap().unwrap().active);
    assert_eq!(start_record(&store, app_id, 2).await, (0, 1));
    let activated = events_of(&store, app_id, "activated").await;
    assert_eq!(activated.len(), 2);
    assert_eq!(activated[1].data["version"], 2);
    let kinds: Vec<String> = store
        .events(app_id, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        &kinds[kinds.len() - 2..],
        ["instance_ready", "activated"],
        "{kinds:?}"
    );

    // Builds that finish out of order: the newest version stays the target.
    deploy(&store, org, "promo", None).await;
    deploy(&store, org, "promo", None).await;
    store.put_blob("art3", b"a3").await.unwrap();
    store.put_blob("art4", b"a4").await.unwrap();
    let t3 = store
        .claim_build(&h.host_id, &h.session, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let t4 = store
        .claim_build(&h.host_id, &h.session, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((t3.version, t4.version), (3, 4));
    assert_eq!(
        store
            .complete_build(t4.id, &h.host_id, &h.session, Ok("art4"))
            .await
            .unwrap(),
        CompleteOutcome::Succeeded { activated: true }
    );
    assert_eq!(
        store
            .complete_build(t3.id, &h.host_id, &h.session, Ok("art3"))
            .await
            .unwrap(),
        CompleteOutcome::Succeeded { activated: false }
    );
    assert_eq!(versions_of(&store, org, "promo").await, (Some(2), Some(4)));
    assert_eq!(
        store.get_version(app_id, 3).await.unwrap().unwrap().state,
        VersionState::Ready
    );
    assert_eq!(active_versions(&store, "promo").await, vec![2, 4]);
    // A ready instance of a version that is not the target changes nothing.
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                inst("v2-a", "promo", 2, InstanceState::Ready),
                inst("v3-a", "promo", 3, InstanceState::Ready),
            ],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "promo").await, (Some(2), Some(4)));
    assert_eq!(
        route_of(&store, "promo").await,
        (Some(2), vec!["v2-a".into()])
    );
    assert_eq!(events_of(&store, app_id, "promoting").await.len(), 3);
}

async fn crash_looping_target_is_failed(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    let h = store.register_host(&reg("h1")).await.unwrap();
    let app_id = serving_v1(&store, org, &h, "loop").await;
    deploy(&store, org, "loop", None).await;
    build_next(&store, &h, Ok("art2")).await;
    assert_eq!(versions_of(&store, org, "loop").await, (Some(1), Some(2)));

    let serving = || inst("v1-a", "loop", 1, InstanceState::Ready);
    // Two instances of version 2 exit; the same exit reported again (and
    // instances of version 2 that merely start) count once.
    for report in [
        vec![serving(), exited("c1", "loop", 2, "exit status 1")],
        vec![serving(), exited("c1", "loop", 2, "exit status 1")],
        vec![serving(), inst("c2", "loop", 2, InstanceState::Starting)],
        vec![serving(), exited("c2", "loop", 2, "exit status 2")],
    ] {
        store
            .heartbeat(&h.host_id, &h.session, &report)
            .await
            .unwrap();
    }
    assert_eq!(start_record(&store, app_id, 2).await, (2, 0));
    assert_eq!(versions_of(&store, org, "loop").await, (Some(1), Some(2)));
    assert_eq!(
        store.get_version(app_id, 2).await.unwrap().unwrap().state,
        VersionState::Ready
    );
    assert!(events_of(&store, app_id, "version_failed").await.is_empty());

    // The third exit fails it; version 1 keeps serving.
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[serving(), exited("c3", "loop", 2, "killed by signal 9")],
        )
        .await
        .unwrap();
    assert_eq!(start_record(&store, app_id, 2).await, (3, 0));
    let v2 = store.get_version(app_id, 2).await.unwrap().unwrap();
    assert_eq!(v2.state, VersionState::Failed);
    let error = v2.error.unwrap_or_default();
    assert_eq!(
        error,
        "version 2 failed to start: 3 instances exited before becoming ready; last: killed by signal 9"
    );
    assert_eq!(versions_of(&store, org, "loop").await, (Some(1), None));
    assert_eq!(
        route_of(&store, "loop").await,
        (Some(1), vec!["v1-a".into()])
    );
    assert_eq!(active_versions(&store, "loop").await, vec![1]);
    let failed = events_of(&store, app_id, "version_failed").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].data["version"], 2);
    assert_eq!(failed[0].message, error);
    assert_eq!(events_of(&store, app_id, "instance_exited").await.len(), 3);
    // A failed version cannot be rolled back to, and more exits change nothing.
    let err = store.rollback(app_id, Some(2)).await.unwrap_err();
    assert!(err.to_string().contains("failed to start"), "{err}");
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[serving(), exited("c4", "loop", 2, "exit status 3")],
        )
        .await
        .unwrap();
    assert_eq!(events_of(&store, app_id, "version_failed").await.len(), 1);
    assert_eq!(
        store.get_version(app_id, 2).await.unwrap().unwrap().error,
        Some(error)
    );

    // Version 3 starts, is promoted, and later its instances exit: a
    // version that has been ready is not failed for exits, even when it is
    // the target again (after a rollback).
    deploy(&store, org, "loop", None).await;
    assert_eq!(
        build_next(&store, &h, Ok("art3")).await,
        (3, CompleteOutcome::Succeeded { activated: true })
    );
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[serving(), inst("d1", "loop", 3, InstanceState::Ready)],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "loop").await, (Some(3), None));
    assert_eq!(store.rollback(app_id, Some(1)).await.unwrap(), 1);
    assert_eq!(versions_of(&store, org, "loop").await, (Some(3), Some(1)));
    for (i, id) in ["e1", "e2", "e3", "e4"].into_iter().enumerate() {
        store
            .heartbeat(
                &h.host_id,
                &h.session,
                &[
                    inst("d1", "loop", 3, InstanceState::Ready),
                    exited(id, "loop", 1, &format!("exit status {i}")),
                    exited(&format!("d-{id}"), "loop", 3, "exit status 1"),
                ],
            )
            .await
            .unwrap();
    }
    assert_eq!(start_record(&store, app_id, 1).await, (0, 1));
    assert_eq!(start_record(&store, app_id, 3).await, (0, 1));
    assert_eq!(versions_of(&store, org, "loop").await, (Some(3), Some(1)));
    for v in [1, 3] {
        assert_eq!(
            store.get_version(app_id, v).await.unwrap().unwrap().state,
            VersionState::Ready
        );
    }
    assert_eq!(events_of(&store, app_id, "version_failed").await.len(), 1);
    assert_eq!(route_of(&store, "loop").await, (Some(3), vec!["d1".into()]));
}

async fn rollback_goes_through_the_target(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    let h = store.register_host(&reg("h1")).await.unwrap();
    let app_id = serving_v1(&store, org, &h, "back").await;
    deploy(&store, org, "back", None).await;
    build_next(&store, &h, Ok("art2")).await;
    // Version 2 takes over; version 1's instance is stopped.
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[inst("v2-a", "back", 2, InstanceState::Ready)],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "back").await, (Some(2), None));
    assert_eq!(active_versions(&store, "back").await, vec![2]);

    // Rolling back only makes version 1 the target: it runs again beside
    // version 2, which serves until an instance of version 1 is ready.
    assert_eq!(store.rollback(app_id, None).await.unwrap(), 1);
    assert_eq!(versions_of(&store, org, "back").await, (Some(2), Some(1)));
    assert_eq!(active_versions(&store, "back").await, vec![1, 2]);
    assert_eq!(
        route_of(&store, "back").await,
        (Some(2), vec!["v2-a".into()])
    );
    assert!(store.get_version(app_id, 2).await.unwrap().unwrap().active);
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                inst("v2-a", "back", 2, InstanceState::Ready),
                inst("v1-b", "back", 1, InstanceState::Starting),
            ],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "back").await, (Some(2), Some(1)));
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                inst("v2-a", "back", 2, InstanceState::Ready),
                inst("v1-b", "back", 1, InstanceState::Ready),
            ],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "back").await, (Some(1), None));
    assert_eq!(
        route_of(&store, "back").await,
        (Some(1), vec!["v1-b".into()])
    );
    assert_eq!(active_versions(&store, "back").await, vec![1]);
    let activated = events_of(&store, app_id, "activated").await;
    assert_eq!(
        activated
            .iter()
            .map(|e| e.data["version"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 1]
    );

    // Rolling back to the active version cancels a pending target.
    assert_eq!(store.rollback(app_id, Some(2)).await.unwrap(), 2);
    assert_eq!(versions_of(&store, org, "back").await, (Some(1), Some(2)));
    assert_eq!(store.rollback(app_id, Some(1)).await.unwrap(), 1);
    assert_eq!(versions_of(&store, org, "back").await, (Some(1), None));
    assert_eq!(active_versions(&store, "back").await, vec![1]);
    // A ready instance of the cancelled target changes nothing.
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                inst("v1-b", "back", 1, InstanceState::Ready),
                inst("v2-b", "back", 2, InstanceState::Ready),
            ],
        )
        .await
        .unwrap();
    assert_eq!(versions_of(&store, org, "back").await, (Some(1), None));
    assert_eq!(
        route_of(&store, "back").await,
        (Some(1), vec!["v1-b".into()])
    );
    assert_eq!(events_of(&store, app_id, "rollback").await.len(), 3);

    // A newer build supersedes a rollback target.
    assert_eq!(store.rollback(app_id, Some(2)).await.unwrap(), 2);
    deploy(&store, org, "back", None).await;
    assert_eq!(
        build_next(&store, &h, Ok("art3")).await,
        (3, CompleteOutcome::Succeeded { activated: true })
    );
    assert_eq!(versions_of(&store, org, "back").await, (Some(1), Some(3)));
    assert_eq!(active_versions(&store, "back").await, vec![1, 3]);
}

#[tokio::test]
async fn connect_reports_unreachable_postgres() {
    let err = Store::connect_timeout(
        "postgres://nobody:pw@127.0.0.1:1/none",
        Duration::from_millis(500),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("127.0.0.1:1") && msg.contains("running"),
        "{msg}"
    );
    assert!(!msg.contains("pw@"), "{msg}");
}

#[tokio::test]
async fn sqlite_file_is_created_and_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/sub/dir/x.db", dir.path().display());
    let s = Store::connect(&url).await.unwrap();
    let tok = s.create_host_token().await.unwrap();
    s.close().await;
    let s = Store::connect(&url).await.unwrap();
    assert!(s.authenticate(&tok).await.unwrap().is_some());
    let (_a, _b) = (sqlite_store, postgres_store);
}
