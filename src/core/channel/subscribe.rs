//! SUBSCRIBE and UNSUBSCRIBE: filter validation, capabilities, permissions, granted QoS,
//! the retained-message rules of each subscription.

use super::*;

pub(super) fn is_shared(filter: &str) -> bool {
    filter.starts_with("$share/") || filter.starts_with("$queue/")
}

/// `$share/{group}/` or `$queue/` with nothing after: the topic filter proper is empty, which
/// makes the packet malformed [MQTT-4.7.3-1] rather than the one filter invalid.
fn shared_without_filter(filter: &str) -> bool {
    if let Some(rest) = filter.strip_prefix("$share/") {
        return rest
            .split_once('/')
            .is_some_and(|(_, topic)| topic.is_empty());
    }
    filter == "$queue/"
}

impl Channel {
    pub(super) fn handle_subscribe(&mut self, subscribe: Subscribe) {
        let limits = Arc::clone(&self.limits);
        let id = subscribe
            .properties
            .subscription_identifiers
            .first()
            .copied();
        if id.is_some() && !limits.subscription_identifiers_available {
            return self.protocol_error(ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED);
        }
        if subscribe
            .filters
            .iter()
            .any(|(f, _)| shared_without_filter(f))
        {
            return self.protocol_error(ReasonCode::MALFORMED_PACKET);
        }
        // [MQTT-3.8.3-4]: No Local on a shared subscription is a protocol error.
        if subscribe
            .filters
            .iter()
            .any(|(f, o)| o.no_local && is_shared(f))
        {
            return self.protocol_error(ReasonCode::PROTOCOL_ERROR);
        }
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        for (raw, options) in subscribe.filters {
            let reason = self.subscribe_one(&raw, options, id, &limits);
            reasons.push(reason);
        }
        self.reply(&Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            properties: Properties::default(),
            reasons,
        }));
    }

    /// The topic or filter `raw` after the first rewrite rule for `action` that matches it
    /// (EMQX's topic rewrite); `None` when no rule changes it.
    pub(super) fn rewritten(&self, action: RewriteAction, raw: &str) -> Option<String> {
        if self.limits.rewrite.is_empty() {
            return None;
        }
        let username = self.username.as_deref();
        rewrite::rewrite(&self.limits.rewrite, action, raw, &self.client_id, username)
    }

    /// Subscribes the client to every `auto_subscribe` filter, with `host` and `port` (the
    /// client's address) for the placeholders: as if it had sent the SUBSCRIBE itself (rewrite,
    /// ACL and retained messages apply), without a SUBACK.
    pub fn auto_subscribe(&mut self, host: &str, port: u16) {
        if self.limits.auto_subscribe.is_empty() || self.state != State::Connected {
            return;
        }
        let limits = Arc::clone(&self.limits);
        for rule in &limits.auto_subscribe {
            let username = self.username.clone();
            let filter = rewrite::expand(
                &rule.topic,
                &self.client_id,
                username.as_deref(),
                host,
                port,
            );
            let reason = self.subscribe_one(&filter, rule.options, None, &limits);
            if reason.is_failure() {
                tracing::debug!(client_id = %self.client_id, %filter, %reason, "auto subscription refused");
            }
        }
    }

    pub(super) fn subscribe_one(
        &mut self,
        raw: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
        limits: &Limits,
    ) -> ReasonCode {
        let rewritten = self.rewritten(RewriteAction::Subscribe, raw);
        let raw = rewritten.as_deref().unwrap_or(raw);
        let Ok(filter) = TopicFilter::parse(raw, limits.max_topic_levels) else {
            return ReasonCode::TOPIC_FILTER_INVALID;
        };
        if filter.share_group().is_some() && !limits.shared_subscription_available {
            return ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED;
        }
        if filter.has_wildcards() && !limits.wildcard_subscription_available {
            return ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED;
        }
        if !self.allowed(Access::Subscribe, filter.filter()) {
            self.denied += 1;
            return ReasonCode::NOT_AUTHORIZED;
        }
        if filter.is_exclusive() {
            if !limits.exclusive_subscription {
                return ReasonCode::TOPIC_FILTER_INVALID;
            }
            // Held by another client: EMQX answers Quota exceeded (3.1.1: 0x80).
            let claimed = self
                .admission
                .as_ref()
                .is_none_or(|a| a.claim_exclusive(filter.filter(), &self.client_id));
            if !claimed {
                return ReasonCode::QUOTA_EXCEEDED;
            }
        }
        let Some(session) = self.session.as_mut() else {
            return ReasonCode::UNSPECIFIED_ERROR;
        };
        let flow = self.input_flow;
        // A subscription the broker parked on the control flow when the client's stream for
        // it died, subscribed again on a data flow: taken back, not doubled.
        let parked = if flow.is_control() {
            None
        } else {
            session.take_parked(filter.as_str())
        };
        let is_new = parked.is_none()
            && !session
                .subscriptions
                .contains_key(&(flow, filter.as_str().to_owned()));
        if is_new
            && limits.max_subscriptions > 0
            && session.subscriptions.len() >= limits.max_subscriptions
        {
            return ReasonCode::QUOTA_EXCEEDED;
        }
        let granted = options.qos.min(limits.maximum_qos);
        let subscription = Subscription {
            filter,
            options: SubscriptionOptions {
                qos: granted,
                ..options
            },
            id,
            flow,
        };
        session.subscribe(subscription.clone());
        // Retain Handling [MQTT-3.3.1-9, -10, -11]; shared subscriptions get no retained
        // messages on subscribe [MQTT-4.8.2-?] (as EMQX and Mosquitto do).
        let send_retained = subscription.filter.share_group().is_none()
            && match options.retain_handling {
                0 => true,
                1 => is_new,
                _ => false,
            };
        if parked.is_some() {
            self.actions.push_back(Action::Move {
                subscription: subscription.clone(),
                from: Flow::CONTROL,
            });
            if send_retained {
                // Retain Handling 0 sends the retained messages at every subscribe (putting
                // the moved subscription into the router again changes nothing).
                self.actions.push_back(Action::Subscribe {
                    subscription,
                    send_retained: true,
                });
            }
        } else {
            self.actions.push_back(Action::Subscribe {
                subscription,
                send_retained,
            });
        }
        ReasonCode(granted as u8)
    }

    pub(super) fn handle_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        if unsubscribe.filters.iter().any(|f| shared_without_filter(f)) {
            return self.protocol_error(ReasonCode::MALFORMED_PACKET);
        }
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for raw in unsubscribe.filters {
            let raw = self
                .rewritten(RewriteAction::Subscribe, &raw)
                .unwrap_or(raw);
            let flow = self.input_flow;
            let removed = self
                .session
                .as_mut()
                .and_then(|s| s.unsubscribe(flow, &raw));
            let reason = match removed {
                Some(subscription) => {
                    self.actions.push_back(Action::Unsubscribe {
                        filter: subscription.filter,
                        flow,
                    });
                    ReasonCode::SUCCESS
                }
                None if TopicFilter::parse(&raw, self.limits.max_topic_levels).is_err() => {
                    ReasonCode::TOPIC_FILTER_INVALID
                }
                None => ReasonCode::NO_SUBSCRIPTION_EXISTED,
            };
            reasons.push(reason);
        }
        if !self.version.is_v5() {
            reasons.clear();
        }
        self.reply(&Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            properties: Properties::default(),
            reasons,
        }));
    }
}
