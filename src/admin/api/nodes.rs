//! `/api/v5/nodes`, `/api/v5/nodes/{node}` (and its `/stats` and `/metrics`),
//! `/api/v5/stats` and `/api/v5/metrics`: this node alone, or, with the cluster's presence
//! (`cluster::presence`), every node: this one as it is now, the others as they last reported
//! themselves (every few seconds). Stats and metrics list the running nodes only, as EMQX does.

use serde_json::Map;

use super::*;
use crate::admin::metrics::node_report;

/// Every node's report (its `/api/v5/nodes` entry with `stats` and `metrics`), sorted by
/// name.
fn reports(state: &AdminState) -> Vec<Value> {
    match &state.presence {
        Some(presence) => presence.nodes(),
        None => vec![node_report(
            &state.broker,
            &state.node,
            state.started.elapsed(),
        )],
    }
}

/// The report of the node named `name`, or EMQX's 404.
fn report_of(state: &AdminState, name: &str) -> ApiResult<Value> {
    reports(state)
        .into_iter()
        .find(|r| r["node"] == name)
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", format!("Node not found: {name}")))
}

fn running(report: &Value) -> bool {
    report["node_status"] == "running"
}

/// A report as `/api/v5/nodes` shows it: without its stats and metrics.
fn entry(mut report: Value) -> Value {
    if let Value::Object(map) = &mut report {
        map.remove("stats");
        map.remove("metrics");
    }
    report
}

/// One group (`stats` or `metrics`) of a report: an object (empty if the report has none).
fn group(report: &Value, name: &str) -> Value {
    match &report[name] {
        Value::Object(map) => Value::Object(map.clone()),
        _ => json!({}),
    }
}

pub(super) async fn nodes(State(state): Shared) -> Json<Value> {
    Json(Value::Array(
        reports(&state).into_iter().map(entry).collect(),
    ))
}

pub(super) async fn node(State(state): Shared, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(entry(report_of(&state, &name)?)))
}

pub(super) async fn node_stats(
    State(state): Shared,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(group(&report_of(&state, &name)?, "stats")))
}

pub(super) async fn node_metrics(
    State(state): Shared,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(group(&report_of(&state, &name)?, "metrics")))
}

/// Stats that describe the whole cluster, not one node (EMQX keeps them cluster-wide):
/// the aggregate takes them from this node instead of summing them.
const CLUSTER_WIDE_STATS: [&str; 4] = [
    "retained.count",
    "retained.bytes",
    "topics.count",
    "subscriptions.shared.count",
];

fn per_node(
    state: &AdminState,
    params: &HashMap<String, String>,
    name: &str,
    cluster_wide: &[&str],
) -> ApiResult<Json<Value>> {
    let aggregate = flag(params, "aggregate")? == Some(true);
    Ok(Json(gather(
        reports(state),
        &state.node,
        name,
        cluster_wide,
        aggregate,
    )))
}

/// `group` (`stats` or `metrics`) of every running node in `reports`: summed when
/// `aggregate` (but the `cluster_wide` keys, taken from `local`, this node), else one object
/// per node with its `node`, as EMQX answers.
fn gather(
    reports: Vec<Value>,
    local: &str,
    group_name: &str,
    cluster_wide: &[&str],
    aggregate: bool,
) -> Value {
    let reports: Vec<Value> = reports.into_iter().filter(running).collect();
    if !aggregate {
        let list = reports
            .iter()
            .map(|r| {
                let mut one = group(r, group_name);
                one["node"] = r["node"].clone();
                one
            })
            .collect();
        return Value::Array(list);
    }
    let groups: Vec<Value> = reports.iter().map(|r| group(r, group_name)).collect();
    let mut sum = sum_numbers(&groups);
    let local = reports.iter().find(|r| r["node"] == local);
    if let (Value::Object(sum), Some(local)) = (&mut sum, local) {
        let local = group(local, group_name);
        for key in cluster_wide {
            if let Some(value) = local.get(key) {
                sum.insert((*key).to_owned(), value.clone());
            }
        }
    }
    sum
}

/// The key-wise sum of the numbers of `groups` (objects): whole numbers stay whole; other
/// values are left out.
fn sum_numbers(groups: &[Value]) -> Value {
    let mut sum = Map::new();
    for group in groups {
        let Value::Object(map) = group else { continue };
        for (key, value) in map {
            let Value::Number(add) = value else { continue };
            let total = match (sum.get(key), add.as_u64()) {
                (None, _) => Value::Number(add.clone()),
                (Some(Value::Number(was)), Some(add)) if was.is_u64() => {
                    json!(was.as_u64().unwrap_or(0).saturating_add(add))
                }
                (Some(was), _) => {
                    json!(was.as_f64().unwrap_or(0.0) + add.as_f64().unwrap_or(0.0))
                }
            };
            sum.insert(key.clone(), total);
        }
    }
    Value::Object(sum)
}

pub(super) async fn stats(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    per_node(&state, &params, "stats", &CLUSTER_WIDE_STATS)
}

pub(super) async fn metrics_json(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    per_node(&state, &params, "metrics", &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_key_wise_and_keep_integers() {
        let sum = sum_numbers(&[
            json!({"a": 1, "b": 2.5, "c": "x"}),
            json!({"a": 2, "d": 4}),
            json!("not an object"),
        ]);
        assert_eq!(sum, json!({"a": 3, "b": 2.5, "d": 4}));
        assert!(sum["a"].is_u64());
    }

    #[test]
    fn stats_list_running_nodes_or_sum_them() {
        let reports = vec![
            json!({"node": "a", "node_status": "running",
                   "stats": {"connections.count": 2, "retained.count": 5}}),
            json!({"node": "b", "node_status": "running",
                   "stats": {"connections.count": 3, "retained.count": 5}}),
            json!({"node": "c", "node_status": "stopped",
                   "stats": {"connections.count": 100, "retained.count": 5}}),
        ];
        let list = gather(reports.clone(), "a", "stats", &CLUSTER_WIDE_STATS, false);
        assert_eq!(
            list,
            json!([
                {"node": "a", "connections.count": 2, "retained.count": 5},
                {"node": "b", "connections.count": 3, "retained.count": 5},
            ])
        );
        let sum = gather(reports, "a", "stats", &CLUSTER_WIDE_STATS, true);
        assert_eq!(sum, json!({"connections.count": 5, "retained.count": 5}));
    }

    #[test]
    fn the_nodes_entry_has_no_stats_or_metrics() {
        let e = entry(json!({"node": "a", "stats": {}, "metrics": {}, "uptime": 1}));
        assert_eq!(e, json!({"node": "a", "uptime": 1}));
        assert_eq!(group(&json!({"stats": 3}), "stats"), json!({}));
    }

    /// A broker with default settings (no listeners): what the API reads.
    fn broker() -> Arc<crate::broker::Broker> {
        use crate::broker::Settings;
        Arc::new(crate::broker::Broker::new(Settings::minimal(10)))
    }

    /// GET `path` with `token`: status and JSON body.
    async fn get(api: std::net::SocketAddr, path: &str, token: &str) -> (u16, Value) {
        let url = format!("http://{api}{path}");
        let auth = format!("Bearer {token}");
        tokio::task::spawn_blocking(move || {
            let answer = ureq::get(&url)
                .timeout(Duration::from_secs(10))
                .set("Authorization", &auth)
                .call();
            let response = match answer {
                Ok(response) | Err(ureq::Error::Status(_, response)) => response,
                Err(err) => panic!("GET {url}: {err}"),
            };
            (response.status(), response.into_json().unwrap())
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn the_api_and_sys_brokers_list_every_node_of_the_cluster() {
        use crate::cluster::presence::Presence;
        use crate::cluster::test_nats::Server as NatsServer;
        let nats = NatsServer::start("api").await;
        let broker = broker();
        // `b` is another node, as it reports itself.
        let b = Presence::start(
            async_nats::jetstream::new(nats.connect().await),
            "api",
            1,
            "petrel@b".into(),
            Arc::new(|| {
                json!({"version": "other", "stats": {"connections.count": 7, "retained.count": 9},
                       "metrics": {"messages.received": 4}})
            }),
        )
        .await
        .unwrap();
        let a = Presence::start(
            async_nats::jetstream::new(nats.connect().await),
            "api",
            1,
            "petrel@a".into(),
            crate::admin::node_report(&broker, "petrel@a".into()),
        )
        .await
        .unwrap();

        let dir = std::env::temp_dir().join(format!("petrel-api-nodes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let settings = crate::admin::ApiSettings {
            bind: "127.0.0.1:0".parse().unwrap(),
            default_password: Some("nodes-test-password".into()),
            ..Default::default()
        };
        let (tracker, shutdown) = (
            tokio_util::task::TaskTracker::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        let served = crate::admin::Served {
            broker: Arc::clone(&broker),
            node: "petrel@a".into(),
            listeners: Vec::new(),
            reload: Default::default(),
        };
        let api = crate::admin::start_in_cluster(
            served,
            Some(Arc::clone(&a)),
            &settings,
            &dir,
            &tracker,
            &shutdown,
        )
        .await
        .unwrap();
        let sys = crate::admin::SysSettings {
            interval: Duration::from_millis(50),
            client_events: false,
        };
        // The publisher stops when its interval's handle is dropped.
        let _interval = crate::admin::start_sys_in_cluster(
            &broker,
            "petrel@a".into(),
            Some(Arc::clone(&a)),
            &sys,
            &tracker,
            &shutdown,
        );
        let token = state_token(api).await;

        let (status, nodes) = get(api, "/api/v5/nodes", &token).await;
        assert_eq!(status, 200);
        let names: Vec<&str> = nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["petrel@a", "petrel@b"], "{nodes}");
        assert_eq!(nodes[0]["version"], env!("CARGO_PKG_VERSION"));
        assert!(nodes[0].get("stats").is_none(), "{nodes}");

        let (status, other) = get(api, "/api/v5/nodes/petrel@b", &token).await;
        assert_eq!(status, 200);
        assert_eq!(other["version"], "other");
        assert_eq!(other["node_status"], "running");
        let (status, missing) = get(api, "/api/v5/nodes/petrel@zz", &token).await;
        assert_eq!(status, 404);
        assert_eq!(missing["code"], "NOT_FOUND");
        let (_, stats) = get(api, "/api/v5/nodes/petrel@b/stats", &token).await;
        assert_eq!(stats["connections.count"], 7);
        let (_, metrics) = get(api, "/api/v5/nodes/petrel@b/metrics", &token).await;
        assert_eq!(metrics["messages.received"], 4);

        let (_, per_node) = get(api, "/api/v5/stats", &token).await;
        assert_eq!(per_node.as_array().unwrap().len(), 2, "{per_node}");
        let (_, sum) = get(api, "/api/v5/stats?aggregate=true", &token).await;
        // No client here: `b`'s connections alone; retained messages are this node's count.
        assert_eq!(sum["connections.count"], 7, "{sum}");
        assert_eq!(sum["retained.count"], broker.retained_count(), "{sum}");

        // `$SYS/brokers` names both running nodes.
        let brokers = || {
            let mut seen = None;
            broker.for_each_retained(|topic, message| {
                if topic == "$SYS/brokers" {
                    seen = Some(String::from_utf8_lossy(&message.payload).into_owned());
                }
            });
            seen
        };
        let mut last = None;
        for _ in 0..100 {
            last = brokers();
            if last.as_deref() == Some("petrel@a,petrel@b") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(last.as_deref(), Some("petrel@a,petrel@b"));

        // `b` leaves: the API and `$SYS/brokers` list `a` alone.
        b.stop().await;
        let mut listed = Value::Null;
        for _ in 0..100 {
            listed = get(api, "/api/v5/nodes", &token).await.1;
            if listed.as_array().map(Vec::len) == Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(listed[0]["node"], "petrel@a", "{listed}");
        for _ in 0..100 {
            last = brokers();
            if last.as_deref() == Some("petrel@a") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(last.as_deref(), Some("petrel@a"));

        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        a.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A dashboard login's token.
    async fn state_token(api: std::net::SocketAddr) -> String {
        tokio::task::spawn_blocking(move || {
            let answer: Value = ureq::post(&format!("http://{api}/api/v5/login"))
                .timeout(Duration::from_secs(10))
                .send_json(json!({"username": "admin", "password": "nodes-test-password"}))
                .unwrap()
                .into_json()
                .unwrap();
            answer["token"].as_str().unwrap().to_owned()
        })
        .await
        .unwrap()
    }
}
