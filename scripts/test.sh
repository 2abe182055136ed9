#!/usr/bin/env bash
# Syncline's whole test run (what CI runs after fmt and clippy):
#  1. every crate's tests, end-to-end tests with real server processes
#     included, in the `ci` profile (optimized, with debug assertions),
#     with a throwaway PostgreSQL and NATS on 127.0.0.1 for the fleet
#     tests (scripts/services.sh, which installs them from Debian's
#     packages if missing; stopped and removed at the end);
#  2. the deterministic fault simulator on 1,000 seeds;
#  3. the SDK example, run against an in-process relay.
set -euo pipefail
cd "$(dirname "$0")/.."
services=$(mktemp -d)
trap 'bash scripts/services.sh stop "$services"' EXIT
eval "$(bash scripts/services.sh start "$services")"
cargo test --workspace --profile ci --locked
cargo run --profile ci --locked -p syncline-sim -- --seeds 1000
cargo run --profile ci --locked -p syncline --example quickstart
