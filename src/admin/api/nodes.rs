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

/// `group` of every running node: summed with `aggregate=true` (but the `cluster_wide`
/// keys, taken from this node), else one object per node with its `node`, as EMQX answers.
fn per_node(
    state: &AdminState,
    params: &HashMap<String, String>,
    name: &str,
    cluster_wide: &[&str],
) -> ApiResult<Json<Value>> {
    let aggregate = flag(params, "aggregate")? == Some(true);
    let reports: Vec<Value> = reports(state).into_iter().filter(running).collect();
    if aggregate {
        let groups: Vec<Value> = reports.iter().map(|r| group(r, name)).collect();
        let mut sum = sum_numbers(&groups);
        let local = reports.iter().find(|r| r["node"] == *state.node);
        if let (Value::Object(sum), Some(local)) = (&mut sum, local) {
            let local = group(local, name);
            for key in cluster_wide {
                if let Some(value) = local.get(key) {
                    sum.insert((*key).to_owned(), value.clone());
                }
            }
        }
        return Ok(Json(sum));
    }
    let list = reports
        .iter()
        .map(|r| {
            let mut one = group(r, name);
            one["node"] = r["node"].clone();
            one
        })
        .collect();
    Ok(Json(Value::Array(list)))
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
    fn the_nodes_entry_has_no_stats_or_metrics() {
        let e = entry(json!({"node": "a", "stats": {}, "metrics": {}, "uptime": 1}));
        assert_eq!(e, json!({"node": "a", "uptime": 1}));
        assert_eq!(group(&json!({"stats": 3}), "stats"), json!({}));
    }
}
