//! Publishing through the API; retained and delayed messages; the rewrite and
//! auto-subscribe rules.

use super::*;

// ---- publish ------------------------------------------------------------------------------

#[derive(Deserialize)]
pub(super) struct PublishBody {
    topic: String,
    #[serde(default)]
    clientid: Option<String>,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    payload_encoding: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    properties: Option<PublishProperties>,
}

#[derive(Deserialize, Default)]
pub(super) struct PublishProperties {
    payload_format_indicator: Option<u8>,
    message_expiry_interval: Option<u32>,
    response_topic: Option<String>,
    correlation_data: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    user_properties: HashMap<String, String>,
}

pub(super) fn message_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut id = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut id);
    id.iter().map(|b| format!("{b:02X}")).collect()
}

pub(super) fn publish_one(state: &AdminState, body: PublishBody) -> ApiResult<Value> {
    let limits = state.broker.limits();
    let topic = TopicName::parse(body.topic.clone(), limits.max_topic_levels)
        .map_err(|err| ApiError::bad_request(format!("topic {:?}: {err}", body.topic)))?;
    let qos =
        QoS::from_u8(body.qos).ok_or_else(|| ApiError::bad_request("`qos` must be 0, 1 or 2"))?;
    let payload = match body.payload_encoding.as_deref() {
        None | Some("plain") => body.payload.into_bytes(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body.payload.as_bytes())
            .map_err(|err| ApiError::bad_request(format!("payload is not base64: {err}")))?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`payload_encoding` must be plain or base64, not {other}"
            )))
        }
    };
    if payload.len() > limits.max_packet_size as usize {
        return Err(ApiError::bad_request(format!(
            "payload larger than mqtt.max_packet_size ({} bytes)",
            limits.max_packet_size
        )));
    }
    let mut properties = Properties::default();
    if let Some(p) = body.properties {
        let set = &mut *properties;
        set.payload_format_indicator = p.payload_format_indicator;
        set.message_expiry_interval = p.message_expiry_interval;
        set.response_topic = p.response_topic;
        set.correlation_data = p
            .correlation_data
            .map(|c| bytes::Bytes::from(c.into_bytes()));
        set.content_type = p.content_type;
        set.user_properties = p.user_properties.into_iter().collect();
    }
    let publish = Publish {
        dup: false,
        qos,
        retain: body.retain,
        topic: body.topic,
        packet_id: None,
        properties,
        payload: bytes::Bytes::from(payload),
    };
    let now = clock::now();
    let publisher = body.clientid.map(Arc::from);
    // `$delayed/{seconds}/{topic}` is delayed, as a client's publish would be.
    let delayed = match crate::core::delayed::parse(topic.as_str()) {
        Some(_) if !limits.delayed_publish => None,
        None => None,
        Some(Err(crate::core::delayed::DelayedError::BadInterval)) => {
            return Err(ApiError::bad_request(
                "$delayed/{seconds}/{topic}: the interval must be whole seconds, at most 4294967",
            ))
        }
        Some(Err(crate::core::delayed::DelayedError::BadTopic)) => {
            return Err(ApiError::bad_request(
                "$delayed/{seconds}/{topic}: no target topic",
            ))
        }
        Some(Ok((after, target))) => {
            let target = TopicName::parse(target.to_owned(), limits.max_topic_levels)
                .map_err(|err| ApiError::bad_request(format!("delayed topic: {err}")))?;
            Some((after, target))
        }
    };
    let id = message_id();
    match delayed {
        None => {
            let message = AppMessage::from_publish(topic, publish, publisher, now);
            state.broker.publish(Arc::new(message), now);
        }
        Some((after, target)) => {
            use crate::core::access::Admission as _;
            if !state.broker.reserve_delayed() {
                return Err(ApiError::bad_request(
                    "delayed.max_delayed_messages reached (0x97 for a client)",
                ));
            }
            let message = AppMessage::from_publish(target, publish, publisher, now);
            state
                .broker
                .delay(Arc::new(message), now + after)
                .map_err(|refused| {
                    ApiError::internal(format!("the store refused it: {refused:?}"))
                })?;
        }
    }
    Ok(json!({"id": id}))
}

pub(super) async fn publish(
    State(state): Shared,
    Json(body): Json<PublishBody>,
) -> ApiResult<Json<Value>> {
    publish_one(&state, body).map(Json)
}

pub(super) async fn publish_bulk(
    State(state): Shared,
    Json(bodies): Json<Vec<PublishBody>>,
) -> ApiResult<Json<Value>> {
    if bodies.len() > 1000 {
        return Err(ApiError::bad_request(
            "at most 1000 messages per bulk publish",
        ));
    }
    let results: ApiResult<Vec<Value>> =
        bodies.into_iter().map(|b| publish_one(&state, b)).collect();
    Ok(Json(Value::Array(results?)))
}

// ---- retained and delayed messages --------------------------------------------------------

pub(super) fn message_json(topic: &str, message: &AppMessage, payload: bool) -> Value {
    let mut value = json!({
        "topic": topic,
        "qos": message.qos as u8,
        "from_clientid": message.publisher.as_deref(),
        "from_username": null,
        "msgid": null,
    });
    if payload {
        value["payload"] =
            json!(base64::engine::general_purpose::STANDARD.encode(&message.payload));
    }
    value
}

pub(super) async fn retained_list(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    let paging = paging(&params)?;
    let wanted = params.get("topic").cloned();
    let mut all: Vec<(String, Arc<AppMessage>)> = Vec::new();
    state.broker.for_each_retained(|topic, message| {
        if wanted.as_deref().is_none_or(|w| filter_matches(w, topic)) {
            all.push((topic.to_owned(), Arc::clone(message)));
        }
    });
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(paged(all, &paging, |(topic, message)| {
        message_json(topic, message, false)
    }))
}

pub(super) async fn retained_one(
    State(state): Shared,
    Path(topic): Path<String>,
) -> ApiResult<Json<Value>> {
    let message = state
        .broker
        .retained_message(&topic)
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", "Viewed message doesn't exist"))?;
    Ok(Json(message_json(&topic, &message, true)))
}

pub(super) async fn retained_delete(
    State(state): Shared,
    Path(topic): Path<String>,
) -> ApiResult<StatusCode> {
    if state.broker.delete_retained(&topic) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "NOT_FOUND",
            "Viewed message doesn't exist",
        ))
    }
}

pub(super) fn delayed_json(
    state: &AdminState,
    view: &crate::broker::view::DelayedView,
    payload: bool,
) -> Value {
    let now = clock::now();
    let remaining = view.due.saturating_duration_since(now);
    let expected = clock::wall() + remaining;
    let mut value = message_json(view.message.topic.as_str(), &view.message, payload);
    value["msgid"] = json!(format!("{:X}", view.id));
    value["node"] = json!(&*state.node);
    value["delayed_remaining"] = json!(remaining.as_secs());
    value["expected_at"] = json!(rfc3339(expected));
    value
}

pub(super) async fn delayed_list(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    let paging = paging(&params)?;
    let all = state.broker.delayed_view();
    Ok(paged(all, &paging, |d| delayed_json(&state, d, false)))
}

pub(super) fn delayed_id(text: &str) -> ApiResult<u64> {
    u64::from_str_radix(text, 16).map_err(|_| ApiError::bad_request(format!("bad msgid {text}")))
}

pub(super) async fn delayed_one(
    State(state): Shared,
    Path(msgid): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = delayed_id(&msgid)?;
    state
        .broker
        .delayed_view()
        .iter()
        .find(|d| d.id == id)
        .map(|d| Json(delayed_json(&state, d, true)))
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", "Message ID not found"))
}

pub(super) async fn delayed_delete(
    State(state): Shared,
    Path(msgid): Path<String>,
) -> ApiResult<StatusCode> {
    if state.broker.delete_delayed(delayed_id(&msgid)?) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("NOT_FOUND", "Message ID not found"))
    }
}

pub(super) async fn rewrite_rules(State(state): Shared) -> Json<Value> {
    let rules: Vec<Value> = state
        .broker
        .limits()
        .rewrite
        .iter()
        .map(|rule| {
            json!({
                "action": match rule.action {
                    crate::core::rewrite::RewriteAction::Publish => "publish",
                    crate::core::rewrite::RewriteAction::Subscribe => "subscribe",
                    crate::core::rewrite::RewriteAction::All => "all",
                },
                "source_topic": rule.source.as_str(),
                "re": rule.re.as_str(),
                "dest_topic": rule.dest,
            })
        })
        .collect();
    Json(Value::Array(rules))
}

pub(super) async fn auto_subscribe(State(state): Shared) -> Json<Value> {
    let topics: Vec<Value> = state
        .broker
        .limits()
        .auto_subscribe
        .iter()
        .map(|rule| {
            json!({
                "topic": rule.topic,
                "qos": rule.options.qos as u8,
                "nl": u8::from(rule.options.no_local),
                "rap": u8::from(rule.options.retain_as_published),
                "rh": rule.options.retain_handling,
            })
        })
        .collect();
    Json(Value::Array(topics))
}
