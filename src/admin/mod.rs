//! Operations: the HTTP API on 18083 in EMQX's `/api/v5` shapes, Prometheus metrics, the
//! dashboard's pages, and the `$SYS` topics. It reads the broker through `broker::view`
//! and acts only through the broker's own operations (kick, publish, delete a retained
//! message); `core` never imports it.

mod settings;

pub use settings::{ApiSettings, SysSettings};
