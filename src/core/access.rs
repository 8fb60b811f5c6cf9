//! The authorization seam: the channel asks an [`Authorizer`] before it routes a PUBLISH,
//! accepts a subscription or delivers a message. The shell supplies the implementation
//! (`crate::auth`); the core never knows where the rules come from. No authorizer set means
//! everything is allowed, at no cost on the message path.

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Publish to a topic name.
    Publish,
    /// Subscribe to a filter (without its `$share/group/` prefix).
    Subscribe,
    /// Receive a message on a topic name: queued, retained and will messages are checked
    /// again on delivery, so a permission removed since holds.
    Receive,
}

/// Broker-wide decisions the channel needs while it handles a packet, answered at once from
/// shared state (the shell implements it over its locks): who holds an exclusive
/// subscription, and room for one more delayed message. Without one, both always succeed.
pub trait Admission: Send + Sync {
    /// Claims the `$exclusive/` filter (without its prefix) for `client_id`; `false` if
    /// another client holds it. Claiming again what one holds succeeds.
    fn claim_exclusive(&self, filter: &str, client_id: &str) -> bool;

    /// Reserves room for one more delayed message; `false` past the configured maximum.
    fn reserve_delayed(&self) -> bool;
}

/// Decides access for one connected client. Called synchronously on the connection's task;
/// implementations must not block.
pub trait Authorizer: Send + Sync {
    fn allows(&self, client_id: &str, username: Option<&str>, access: Access, topic: &str) -> bool;

    /// Changes whenever the rules change (a reload), so callers can drop cached answers.
    fn generation(&self) -> u64;
}
