//! The banned list, and reload.

use super::*;

// ---- banned -------------------------------------------------------------------------------

pub(super) fn ban_json(ban: &Ban) -> Value {
    let at = |secs: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
    json!({
        "as": ban.kind,
        "who": ban.who,
        "by": ban.by,
        "reason": ban.reason,
        "at": at(ban.at),
        "until": ban.until.map(at).unwrap_or_else(|| "infinity".into()),
    })
}

pub(super) async fn banned_list(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    let paging = paging(&params)?;
    Ok(paged(
        state.broker.auth().banned().list(),
        &paging,
        ban_json,
    ))
}

#[derive(Deserialize)]
pub(super) struct BanBody {
    #[serde(rename = "as")]
    kind: String,
    who: String,
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    until: Option<String>,
}

pub(super) fn parse_time(key: &str, text: &str) -> ApiResult<u64> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    humantime::parse_rfc3339_weak(text)
        .map(epoch_secs)
        .map_err(|_| {
            ApiError::bad_request(format!(
                "`{key}` must be RFC 3339 or seconds since the epoch"
            ))
        })
}

pub(super) async fn banned_add(
    State(state): Shared,
    caller: Option<axum::Extension<crate::admin::auth::Caller>>,
    Json(body): Json<BanBody>,
) -> ApiResult<Json<Value>> {
    let kind = BanKind::parse(&body.kind)
        .ok_or_else(|| ApiError::bad_request("`as` must be clientid, username or peerhost"))?;
    let now = epoch_secs(clock::wall());
    let at = body
        .at
        .as_deref()
        .map(|t| parse_time("at", t))
        .transpose()?
        .unwrap_or(now);
    let until = match body.until.as_deref() {
        None | Some("infinity") => None,
        Some(text) => Some(parse_time("until", text)?),
    };
    let ban = Ban {
        kind,
        who: body.who,
        by: body
            .by
            .or_else(|| caller.map(|c| c.0.name().to_owned()))
            .unwrap_or_default(),
        reason: body.reason.unwrap_or_default(),
        at,
        until,
    };
    let ban = state
        .broker
        .auth()
        .banned()
        .add(ban)
        .map_err(|err| match err {
            crate::auth::banned::BannedError::Save { .. } => ApiError::internal(err.to_string()),
            _ => ApiError::bad_request(err.to_string()),
        })?;
    tracing::info!(kind = ?ban.kind, who = %ban.who, "banned through the API");
    if ban.kind == BanKind::Clientid {
        // EMQX kicks a client banned by its id.
        state.broker.kick(&ban.who);
    }
    Ok(Json(ban_json(&ban)))
}

pub(super) async fn banned_delete(
    State(state): Shared,
    Path((kind, who)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let kind = BanKind::parse(&kind)
        .ok_or_else(|| ApiError::bad_request("`as` must be clientid, username or peerhost"))?;
    match state.broker.auth().banned().remove(kind, &who) {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(ApiError::not_found("NOT_FOUND", "Banned object not found")),
        Err(err) => Err(ApiError::internal(err.to_string())),
    }
}

// ---- reload -------------------------------------------------------------------------------

/// Petrel's own: what SIGHUP does (password and ACL files, log level, `$SYS` interval),
/// answered with the outcome. 503 when nothing serves reloads (a broker embedded in a
/// program other than `petrel`).
pub(super) async fn reload(State(state): Shared) -> ApiResult<Json<Value>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let unavailable = || ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "SERVICE_UNAVAILABLE",
        message: "this process does not serve reloads".into(),
    };
    let sender = state.reload.get().ok_or_else(unavailable)?;
    sender.try_send(tx).map_err(|_| unavailable())?;
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(message))) => Ok(Json(json!({"message": message}))),
        Ok(Ok(Err(message))) => Err(ApiError::bad_request(message)),
        _ => Err(unavailable()),
    }
}
