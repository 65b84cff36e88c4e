//! Autoscaling state in the store, on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use stead_api::{
    AppConfig, HostCapacity, InstanceState, ObservedInstance, RegisterRequest, ScaleRequest,
};
use stead_store::{DemandKind, NewDemand, NewVersion, ScaleStateRow, Store, StoreError};

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
    demand_is_recorded_and_read_back,
    queued_work_is_written_only_when_it_changes,
    decision_state_is_written_optimistically,
    scale_settings_override_until_a_later_deploy,
    ready_instances_are_counted_per_active_version,
    system_database_work_counts_as_queued,
);

/// The control plane's own reading of an app's system database (version
/// work) is queued work for the autoscaler, while it is fresh.
async fn system_database_work_counts_as_queued(store: Store) {
    let web = app(&store, "web", "").await;
    assert_eq!(
        store
            .scale_inputs(WINDOW, HOSTS)
            .await
            .unwrap()
            .queued
            .get(&web),
        None
    );
    store.set_version_work(web, 1, 2, 3).await.unwrap();
    store.set_version_work(web, 2, 1, 0).await.unwrap();
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert_eq!(inputs.queued.get(&web), Some(&6));
    // A stale reading does not count.
    sqlx::query("UPDATE version_work SET checked_at = 0")
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(
        store
            .scale_inputs(WINDOW, HOSTS)
            .await
            .unwrap()
            .queued
            .get(&web),
        None
    );
}

const WINDOW: Duration = Duration::from_secs(60);
const HOSTS: Duration = Duration::from_secs(30);

async fn app(store: &Store, name: &str, toml_extra: &str) -> i64 {
    let token = store.create_user_token("acme", "ann").await.unwrap();
    let org = store
        .authenticate(&token)
        .await
        .unwrap()
        .unwrap()
        .org_id
        .unwrap();
    store.put_blob("b1", b"bundle").await.unwrap();
    let config = AppConfig::from_stead_toml(&format!(
        "name = \"{name}\"\n[run]\nstart = \"./run\"\n{toml_extra}"
    ))
    .unwrap();
    store
        .create_version(&NewVersion {
            org_id: org,
            bundle_hash: "b1".into(),
            bundle_size: 6,
            config,
            idempotency_key: None,
            hold: false,
        })
        .await
        .unwrap();
    store.find_app(name).await.unwrap().unwrap().id
}

async fn make_active(store: &Store, app_id: i64, version: i64) {
    sqlx::query("UPDATE versions SET state = 'ready', artifact_hash = 'a' WHERE app_id = $1 AND number = $2")
        .bind(app_id)
        .bind(version)
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE apps SET active_version = $2 WHERE id = $1")
        .bind(app_id)
        .bind(version)
        .execute(store.pool())
        .await
        .unwrap();
}

fn host(name: &str) -> RegisterRequest {
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

fn demand(app: &str, concurrency: f64, requests: u64, waiting: u64) -> NewDemand {
    NewDemand {
        app: app.into(),
        period_ms: 1000,
        concurrency,
        peak: concurrency.ceil() as u64,
        requests,
        waiting,
        cpu: 0.0,
        detail: Some("[]".into()),
    }
}

async fn demand_is_recorded_and_read_back(store: Store) {
    let web = app(&store, "web", "").await;
    let ids = store
        .record_demand(
            "router-1",
            DemandKind::Router,
            &[demand("web", 12.5, 40, 0), demand("gone", 1.0, 1, 0)],
        )
        .await
        .unwrap();
    assert_eq!(ids, vec![web], "unknown apps are skipped");
    store
        .record_demand(
            "host-1",
            DemandKind::Agent,
            &[NewDemand {
                app: "web".into(),
                period_ms: 1000,
                cpu: 0.75,
                ..NewDemand::default()
            }],
        )
        .await
        .unwrap();
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert_eq!(inputs.samples.len(), 2);
    let r = &inputs.samples[0];
    assert_eq!(
        (r.app_id, r.kind, r.source.as_str()),
        (web, DemandKind::Router, "router-1")
    );
    assert_eq!(
        (r.concurrency, r.peak, r.requests, r.waiting),
        (12.5, 13, 40, 0)
    );
    assert_eq!(r.end_ms - r.start_ms, 1000);
    assert_eq!(r.detail.as_deref(), Some("[]"));
    assert_eq!(inputs.samples[1].cpu, 0.75);
    let active = *inputs.last_active.get(&web).expect("active");
    assert!((stead_store::now_ms() - active).abs() < 5_000);

    // An idle report and an agent's CPU do not count as activity.
    sqlx::query("DELETE FROM app_demand")
        .execute(store.pool())
        .await
        .unwrap();
    store
        .record_demand("router-1", DemandKind::Router, &[demand("web", 0.0, 0, 0)])
        .await
        .unwrap();
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert!(inputs.last_active.is_empty());
    // A held request does.
    store
        .record_demand("router-1", DemandKind::Router, &[demand("web", 0.0, 0, 3)])
        .await
        .unwrap();
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert!(inputs.last_active.contains_key(&web));

    // Old samples leave the window and are pruned.
    let pruned = store.prune_demand(stead_store::now_ms() + 1).await.unwrap();
    assert_eq!(pruned, 4);
    assert!(store
        .scale_inputs(WINDOW, HOSTS)
        .await
        .unwrap()
        .samples
        .is_empty());
}

async fn queued_work_is_written_only_when_it_changes(store: Store) {
    let web = app(&store, "wfapp", "").await;
    let h = store.register_host(&host("h1")).await.unwrap();
    let h2 = store.register_host(&host("h2")).await.unwrap();
    let q = |n: u64| BTreeMap::from([("wfapp".to_string(), n), ("nope".to_string(), 9)]);
    store.record_queued(&h.host_id, &q(5)).await.unwrap();
    store.record_queued(&h2.host_id, &q(7)).await.unwrap();
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert_eq!(inputs.queued.get(&web), Some(&7), "the largest report wins");
    let stamp = || async {
        let row = sqlx::query("SELECT updated_ms FROM app_queue WHERE host_id = $1")
            .bind(&h.host_id)
            .fetch_one(store.pool())
            .await
            .unwrap();
        sqlx::Row::try_get::<i64, _>(&row, "updated_ms").unwrap()
    };
    let first = stamp().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.record_queued(&h.host_id, &q(5)).await.unwrap();
    assert_eq!(stamp().await, first, "unchanged values are not rewritten");
    // Drained on both hosts: gone.
    store
        .record_queued(&h.host_id, &BTreeMap::new())
        .await
        .unwrap();
    store.record_queued(&h2.host_id, &q(0)).await.unwrap();
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert_eq!(inputs.queued.get(&web), None);
    // A dead host's report does not count.
    store.record_queued(&h.host_id, &q(4)).await.unwrap();
    sqlx::query("UPDATE hosts SET last_heartbeat = 0")
        .execute(store.pool())
        .await
        .unwrap();
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert_eq!(inputs.queued.get(&web), None);
}

async fn decision_state_is_written_optimistically(store: Store) {
    let web = app(&store, "web", "").await;
    let first = ScaleStateRow {
        version: Some(1),
        desired: 2,
        panic_until: Some(10),
        below_since: None,
        below_peak: 0,
        updated_ms: 100,
        settled: false,
    };
    assert!(store.save_scale_state(web, None, &first).await.unwrap());
    // A second "first" writer loses.
    assert!(!store.save_scale_state(web, None, &first).await.unwrap());
    let next = ScaleStateRow {
        desired: 3,
        below_since: Some(50),
        below_peak: 1,
        updated_ms: 200,
        ..first.clone()
    };
    assert!(
        !store.save_scale_state(web, Some(99), &next).await.unwrap(),
        "stale token"
    );
    assert!(store.save_scale_state(web, Some(100), &next).await.unwrap());
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert_eq!(inputs.states.get(&web), Some(&next));
}

async fn scale_settings_override_until_a_later_deploy(store: Store) {
    let web = app(
        &store,
        "web",
        "[scale]\nmin = 0\nmax = 3\ntarget_concurrency = 10\nidle_timeout = \"2m\"\n",
    )
    .await;
    make_active(&store, web, 1).await;
    let a = store.scale_apps(Some(web)).await.unwrap().remove(0);
    assert_eq!((a.min, a.max, a.active_version), (0, 3, Some(1)));
    assert_eq!(
        (a.scaling.target_concurrency, a.scaling.idle_timeout_ms),
        (10, 120_000)
    );
    assert!(!a.overridden);

    let set = store
        .set_scale_settings(
            web,
            &ScaleRequest {
                max: Some(8),
                target_concurrency: Some(50),
                max_body_bytes: Some(1024),
                ..ScaleRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (set.min, set.max, set.scaling.target_concurrency),
        (0, 8, 50)
    );
    let a = store.scale_apps(None).await.unwrap().remove(0);
    assert!(a.overridden);
    assert_eq!(
        (
            a.max,
            a.scaling.target_concurrency,
            a.scaling.max_body_bytes
        ),
        (8, 50, 1024)
    );
    assert_eq!(
        a.scaling.idle_timeout_ms, 120_000,
        "untouched settings are kept"
    );
    let events = store.events(web, 0, 100).await.unwrap();
    let scale = events
        .iter()
        .find(|e| e.kind == "scale")
        .expect("scale event");
    assert!(scale.message.contains("max 8"), "{}", scale.message);
    assert!(
        scale.message.contains("target concurrency 50"),
        "{}",
        scale.message
    );

    // Invalid values are refused and change nothing.
    for bad in [
        ScaleRequest {
            min: Some(9),
            ..ScaleRequest::default()
        },
        ScaleRequest {
            target_concurrency: Some(0),
            ..ScaleRequest::default()
        },
        ScaleRequest {
            panic_window_ms: Some(3_600_000),
            ..ScaleRequest::default()
        },
    ] {
        let err = store.set_scale_settings(web, &bad).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    }
    assert_eq!(
        store.scale_apps(Some(web)).await.unwrap()[0]
            .scaling
            .target_concurrency,
        50
    );

    // A version deployed afterwards brings stead.toml's settings back once active.
    app(
        &store,
        "web",
        "[scale]\nmin = 1\nmax = 2\ntarget_concurrency = 7\n",
    )
    .await;
    let a = store.scale_apps(Some(web)).await.unwrap().remove(0);
    assert_eq!(
        a.scaling.target_concurrency, 50,
        "still the override while v1 is active"
    );
    make_active(&store, web, 2).await;
    let a = store.scale_apps(Some(web)).await.unwrap().remove(0);
    assert!(!a.overridden);
    assert_eq!((a.min, a.max, a.scaling.target_concurrency), (1, 2, 7));
    assert_eq!(a.scaling.max_body_bytes, 0);
}

async fn ready_instances_are_counted_per_active_version(store: Store) {
    let web = app(&store, "web", "").await;
    make_active(&store, web, 1).await;
    let h = store.register_host(&host("h1")).await.unwrap();
    let inst = |id: &str, version: u32, state: InstanceState| ObservedInstance {
        id: id.into(),
        app: "web".into(),
        version,
        state,
        executor_id: id.into(),
        endpoint: Some("127.0.0.1:1".into()),
        pid: None,
        started_at_ms: 1,
        exit: None,
        ..serde_json::from_value(serde_json::json!({
            "id": "x", "app": "web", "version": 1, "state": "ready", "executor_id": "x",
            "endpoint": null, "pid": null, "started_at_ms": 0, "exit": null
        }))
        .unwrap()
    };
    store
        .heartbeat(
            &h.host_id,
            &h.session,
            &[
                inst("a", 1, InstanceState::Ready),
                inst("b", 1, InstanceState::Ready),
                inst("c", 1, InstanceState::Starting),
                inst("d", 2, InstanceState::Ready),
            ],
        )
        .await
        .unwrap();
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert_eq!(inputs.ready.get(&web), Some(&2));
    sqlx::query("UPDATE hosts SET last_heartbeat = 0")
        .execute(store.pool())
        .await
        .unwrap();
    let inputs = store.scale_inputs(WINDOW, HOSTS).await.unwrap();
    assert_eq!(
        inputs.ready.get(&web),
        None,
        "instances of dead hosts are not ready"
    );
}
