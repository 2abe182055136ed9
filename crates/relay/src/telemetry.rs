//! Metric names, the Prometheus recorder, and `GET /metrics`.
//!
//! Every metric is in [`METRICS`] with its kind, unit and help text: the
//! recorder describes each (`# HELP`, `# TYPE`) and registers it at zero
//! when installed, so a scrape of an idle relay lists them all;
//! `docs/metrics.md` is the same table for people (a test keeps them in
//! step).

use std::sync::OnceLock;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Open sessions (gauge).
pub(crate) const SESSIONS: &str = "syncline_sessions_open";
/// Open WebSocket connections (gauge).
pub(crate) const CONNECTIONS: &str = "syncline_connections_open";
/// WebSocket connections accepted (counter).
pub(crate) const CONNECTIONS_TOTAL: &str = "syncline_connections_total";
/// TCP connections holding a slot, WebSocket or not yet (gauge).
pub(crate) const TCP_CONNECTIONS: &str = "syncline_tcp_connections";
/// Connections closed by the relay, by reason (counter, label `reason`).
pub(crate) const CONNECTIONS_CLOSED: &str = "syncline_connections_closed_total";
/// Work refused at a bound (counter, label `why`: `connections`,
/// `connections_per_ip`, `accept`, `rooms`, `sessions`, `inbox`).
pub(crate) const REFUSED: &str = "syncline_refused_total";
/// `hello`s refused by access control, by reason (counter, label
/// `reason`: `unauthorized`, `token_expired`).
pub(crate) const AUTH_REFUSED: &str = "syncline_auth_refused_total";
/// Nodes refused because their author may not write them (counter).
pub(crate) const NODES_REFUSED: &str = "syncline_nodes_refused_total";
/// Invites, by `what`: `created`, `redeemed`, `refused` (counter).
pub(crate) const INVITES: &str = "syncline_invites_total";
/// Bytes the store's files take (gauge).
pub(crate) const STORE_BYTES: &str = "syncline_store_bytes";
/// Rooms loaded (gauge).
pub(crate) const ROOMS_LOADED: &str = "syncline_rooms_loaded";
/// Nodes received and inserted (counter).
pub(crate) const NODES_IN: &str = "syncline_nodes_in_total";
/// Nodes sent in packs, catch-up and relay (counter).
pub(crate) const NODES_OUT: &str = "syncline_nodes_out_total";
/// Frame bytes received (counter).
pub(crate) const BYTES_IN: &str = "syncline_bytes_in_total";
/// Frame bytes sent (counter).
pub(crate) const BYTES_OUT: &str = "syncline_bytes_out_total";
/// Blobs removed by garbage collection.
pub(crate) const BLOBS_COLLECTED: &str = "syncline_blobs_collected_total";
/// Blob bytes over direct URLs, by `direction` (`in`, `out`).
pub(crate) const BLOB_HTTP_BYTES: &str = "syncline_blob_http_bytes_total";
/// Handshakes by difference strategy (counter, label `strategy`).
pub(crate) const DIFF_STRATEGY: &str = "syncline_diff_strategy_total";
/// Nodes sent in catch-up packs per session (histogram).
pub(crate) const CATCHUP_NODES: &str = "syncline_catchup_nodes";
/// Sessions closed, by reason (counter, label `reason`).
pub(crate) const SESSIONS_CLOSED: &str = "syncline_sessions_closed_total";
/// From a frame's arrival to its effects (persisted, acked, relayed)
/// queued for sending (histogram, seconds).
pub(crate) const RELAY_SECONDS: &str = "syncline_relay_seconds";

/// Nodes other relays of the fleet stored, caught up with from the
/// database and relayed to this relay's sessions.
pub(crate) const FLEET_NODES_LEARNED: &str = "syncline_fleet_nodes_learned_total";
/// Notices of commits, by `way`: `sent` or `heard` over NATS, or
/// `dropped` (the bus lagged; the others poll).
pub(crate) const FLEET_NOTICES: &str = "syncline_fleet_notices_total";
/// Loaded rooms found behind the database by the periodic check (a
/// notice missed: NATS restarted, or none configured).
pub(crate) const FLEET_BEHIND: &str = "syncline_fleet_rooms_behind_total";
/// 1 while the relay is connected to NATS, else 0.
pub(crate) const FLEET_BUS_CONNECTED: &str = "syncline_fleet_bus_connected";

/// What a metric counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric: name, kind, unit, help.
pub(crate) const METRICS: &[(&str, Kind, Unit, &str)] = &[
    (SESSIONS, Kind::Gauge, Unit::Count, "Sessions open now."),
    (
        CONNECTIONS,
        Kind::Gauge,
        Unit::Count,
        "WebSocket connections open now.",
    ),
    (
        CONNECTIONS_TOTAL,
        Kind::Counter,
        Unit::Count,
        "WebSocket connections accepted.",
    ),
    (
        TCP_CONNECTIONS,
        Kind::Gauge,
        Unit::Count,
        "TCP connections holding a slot, upgraded or not yet.",
    ),
    (
        CONNECTIONS_CLOSED,
        Kind::Counter,
        Unit::Count,
        "Connections the relay closed, by reason.",
    ),
    (
        REFUSED,
        Kind::Counter,
        Unit::Count,
        "Work refused at a bound, by why (connections, connections_per_ip, accept, rooms, sessions, sessions_per_ip, inbox, outbound_total, presence_rate, blob_http).",
    ),
    (
        AUTH_REFUSED,
        Kind::Counter,
        Unit::Count,
        "Hellos refused by access control, by reason (unauthorized, token_expired).",
    ),
    (
        NODES_REFUSED,
        Kind::Counter,
        Unit::Count,
        "Nodes refused because their author may not write them.",
    ),
    (
        INVITES,
        Kind::Counter,
        Unit::Count,
        "Invites, by what (created, redeemed, refused).",
    ),
    (
        STORE_BYTES,
        Kind::Gauge,
        Unit::Bytes,
        "Bytes the store's files take on disk.",
    ),
    (
        ROOMS_LOADED,
        Kind::Gauge,
        Unit::Count,
        "Rooms loaded in memory now.",
    ),
    (
        NODES_IN,
        Kind::Counter,
        Unit::Count,
        "Nodes received and inserted.",
    ),
    (
        NODES_OUT,
        Kind::Counter,
        Unit::Count,
        "Nodes sent in packs (catch-up and relay).",
    ),
    (
        BYTES_IN,
        Kind::Counter,
        Unit::Bytes,
        "Frame bytes received.",
    ),
    (BYTES_OUT, Kind::Counter, Unit::Bytes, "Frame bytes sent."),
    (
        BLOBS_COLLECTED,
        Kind::Counter,
        Unit::Count,
        "Blobs removed by garbage collection (no room ever referenced them).",
    ),
    (
        BLOB_HTTP_BYTES,
        Kind::Counter,
        Unit::Bytes,
        "Blob bytes moved over direct URLs, by direction.",
    ),
    (
        DIFF_STRATEGY,
        Kind::Counter,
        Unit::Count,
        "Handshakes, by difference strategy.",
    ),
    (
        CATCHUP_NODES,
        Kind::Histogram,
        Unit::Count,
        "Nodes sent in catch-up packs over a session's life, per session.",
    ),
    (
        SESSIONS_CLOSED,
        Kind::Counter,
        Unit::Count,
        "Sessions ended, by reason.",
    ),
    (
        FLEET_NODES_LEARNED,
        Kind::Counter,
        Unit::Count,
        "Nodes other relays stored, caught up with from the database and relayed here.",
    ),
    (
        FLEET_NOTICES,
        Kind::Counter,
        Unit::Count,
        "Notices of commits, by way (sent, heard, dropped).",
    ),
    (
        FLEET_BEHIND,
        Kind::Counter,
        Unit::Count,
        "Loaded rooms the periodic check found behind the database.",
    ),
    (
        FLEET_BUS_CONNECTED,
        Kind::Gauge,
        Unit::Count,
        "1 while connected to NATS.",
    ),
    (
        RELAY_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        "From a frame's arrival to its effects (persisted, acknowledged, relayed) queued for sending.",
    ),
];

/// Buckets of [`RELAY_SECONDS`].
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Buckets of [`CATCHUP_NODES`].
const NODE_BUCKETS: &[f64] = &[
    0.0,
    1.0,
    10.0,
    100.0,
    1_000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process (several relays in
/// one test process share it).
pub(crate) fn install() {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(RELAY_SECONDS.into()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(CATCHUP_NODES.into()), NODE_BUCKETS)
            })
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (an embedding app's);
        // then this handle renders nothing, which is the app's choice.
        if metrics::set_global_recorder(recorder).is_ok() {
            for &(name, kind, unit, help) in METRICS {
                match kind {
                    Kind::Counter => {
                        metrics::describe_counter!(name, unit, help);
                        metrics::counter!(name).increment(0);
                    }
                    Kind::Gauge => {
                        metrics::describe_gauge!(name, unit, help);
                        metrics::gauge!(name).increment(0.0);
                    }
                    Kind::Histogram => metrics::describe_histogram!(name, unit, help),
                }
            }
        }
        handle
    });
}

/// `GET /metrics`.
pub(crate) async fn render() -> String {
    HANDLE
        .get()
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_in_the_docs_and_named_by_convention() {
        let docs = include_str!("../../../docs/metrics.md");
        for (name, kind, unit, _) in METRICS {
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} is not in docs/metrics.md"
            );
            assert_eq!(
                name.ends_with("_total"),
                *kind == Kind::Counter,
                "{name}: counters, and only counters, end in _total"
            );
            if *unit == Unit::Bytes {
                assert!(name.contains("bytes"), "{name} is in bytes");
            }
            if *unit == Unit::Seconds {
                assert!(name.ends_with("_seconds"), "{name} is in seconds");
            }
        }
    }
}
