//! Metric names, the Prometheus recorder, and `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Open sessions (gauge).
pub(crate) const SESSIONS: &str = "syncline_sessions";
/// Open WebSocket connections (gauge).
pub(crate) const CONNECTIONS: &str = "syncline_connections";
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
/// Handshakes by difference strategy (counter, label `strategy`).
pub(crate) const DIFF_STRATEGY: &str = "syncline_diff_strategy_total";
/// Nodes sent in catch-up packs per session (histogram).
pub(crate) const CATCHUP_NODES: &str = "syncline_catchup_nodes";
/// Sessions closed, by reason (counter, label `reason`).
pub(crate) const SESSIONS_CLOSED: &str = "syncline_sessions_closed_total";
/// From a frame's arrival to its effects (persisted, acked, relayed)
/// queued for sending (histogram, seconds).
pub(crate) const RELAY_SECONDS: &str = "syncline_relay_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process (several relays in
/// one test process share it).
pub(crate) fn install() {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (an embedding app's);
        // then this handle renders nothing, which is the app's choice.
        let _ = metrics::set_global_recorder(recorder);
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
