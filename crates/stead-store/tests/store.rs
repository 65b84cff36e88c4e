//! Every store test runs on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::Row;
use stead_api::{
    AppConfig, HostCapacity, InstanceLogLine, InstanceState, LogStream, NewLogLine,
    ObservedInstance, RegisterRequest, TokenKind, VersionState,
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
);

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
    let app = store.get_app(org, "comp").await.unwrap().unwrap();
    assert_eq!(app.active_version, Some(1));
    let ver = store.get_version(app.id, 1).await.unwrap().unwrap();
    assert_eq!(ver.state, VersionState::Ready);
    assert!(ver.active);
    assert_eq!(ver.artifact_hash.as_deref(), Some("art1"));

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
    assert_eq!(
        store
            .get_app(org, "comp")
            .await
            .unwrap()
            .unwrap()
            .active_version,
        Some(1)
    );
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
    }
}

async fn heartbeat_replaces_instances(store: Store) {
    let t = store.create_user_token("acme", "ann").await.unwrap();
    let org = org_of(&store, &t).await;
    deploy(&store, org, "beat", None).await;
    let app = store.get_app(org, "beat").await.unwrap().unwrap();
    let h = store.register_host(&reg("h1")).await.unwrap();
    let h2 = store.register_host(&reg("h2")).await.unwrap();
    store
        .heartbeat(
            &h2.host_id,
            &h2.session,
            &[observed("other", "beat", InstanceState::Ready)],
        )
        .await
        .unwrap();

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
    // other ready, i2 ready, i1 ready, i3 exited (after the deploy event).
    assert_eq!(
        kinds,
        vec![
            "deploy",
            "instance_ready",
            "instance_ready",
            "instance_ready",
            "instance_exited"
        ]
    );

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
    store.put_blob("art", b"a").await.unwrap();
    let task = store
        .claim_build(&h.host_id, &h.session, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    store
        .complete_build(task.id, &h.host_id, &h.session, Ok("art"))
        .await
        .unwrap();
    let routes = store.routes(Duration::from_secs(30)).await.unwrap();
    assert_eq!(routes.apps.len(), 1);
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
    store.put_blob("art", b"a").await.unwrap();
    for _ in 0..3 {
        deploy(&store, org, "roll", None).await;
    }
    let app = store.get_app(org, "roll").await.unwrap().unwrap();
    // v1 ready, v2 failed, v3 ready.
    for result in [Ok("art"), Err("boom"), Ok("art")] {
        let task = store
            .claim_build(&h.host_id, &h.session, Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        store
            .complete_build(task.id, &h.host_id, &h.session, result)
            .await
            .unwrap();
    }
    assert_eq!(
        store
            .get_app(org, "roll")
            .await
            .unwrap()
            .unwrap()
            .active_version,
        Some(3)
    );
    let err = store.rollback(app.id, Some(2)).await.unwrap_err();
    assert!(
        err.to_string().contains("failed") && err.to_string().contains("boom"),
        "{err}"
    );
    assert!(matches!(
        store.rollback(app.id, Some(9)).await.unwrap_err(),
        StoreError::NotFound(_)
    ));
    // Default skips the failed one.
    assert_eq!(store.rollback(app.id, None).await.unwrap(), 1);
    assert!(matches!(
        store.rollback(app.id, None).await.unwrap_err(),
        StoreError::Invalid(_)
    ));
    assert_eq!(store.rollback(app.id, Some(3)).await.unwrap(), 3);
    let kinds: Vec<String> = store
        .events(app.id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "rollback").count(), 2);
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
