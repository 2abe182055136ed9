#!/usr/bin/env bash
# Throwaway PostgreSQL and NATS servers for the fleet tests, on 127.0.0.1,
# from Debian's packages (installed if missing).
#
#   eval "$(bash scripts/services.sh start DIR)"   # exports SYNCLINE_TEST_POSTGRES, SYNCLINE_TEST_NATS
#   bash scripts/services.sh restart-nats DIR      # the fleet tests' NATS outage
#   bash scripts/services.sh stop DIR
#
# DIR holds the cluster, the NATS store and their logs; `stop` stops both
# and removes it. Ports are free ones above 40000 (printed in the URLs).
set -euo pipefail

command=${1:?usage: services.sh start|restart-nats|stop DIR}
dir=${2:?usage: services.sh start|restart-nats|stop DIR}

pg_bin() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -z "$bin" ]]; then
        echo "services.sh: installing postgresql" >&2
        apt-get install -y -q postgresql >&2 || { apt-get update -q >&2 && apt-get install -y -q postgresql >&2; }
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    echo "$bin"
}

nats_bin() {
    if ! command -v nats-server >/dev/null; then
        echo "services.sh: installing nats-server" >&2
        apt-get install -y -q nats-server >&2 || { apt-get update -q >&2 && apt-get install -y -q nats-server >&2; }
    fi
    command -v nats-server
}

free_port() {
    python3 - <<'PY'
import socket
for port in range(40000, 60000, 7):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
PY
}

# PostgreSQL refuses to run as root: its files belong to `postgres` then.
as_owner() {
    if [[ $(id -u) == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Starts nats-server on the port saved in DIR/nats/port; waits until it
# accepts connections.
start_nats() {
    local dir=$1 port
    port=$(cat "$dir/nats/port")
    nohup "$(nats_bin)" -a 127.0.0.1 -p "$port" -l "$dir/nats/server.log" >/dev/null 2>&1 &
    echo $! >"$dir/nats/pid"
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "services.sh: nats-server did not start on $port (see $dir/nats/server.log)" >&2
    return 1
}

case "$command" in
start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    bin=$(pg_bin)
    nats_bin >/dev/null
    pg_port=$(free_port)
    mkdir -p "$dir/pg"
    [[ $(id -u) == 0 ]] && chown postgres "$dir/pg" && chmod 755 "$dir"
    as_owner "$bin/initdb" -D "$dir/pg/data" -U syncline --auth=trust -E UTF8 >"$dir/pg/initdb.log" 2>&1
    as_owner "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 60 \
        -o "-p $pg_port -k $dir/pg -c listen_addresses=127.0.0.1 -c max_connections=300" start >&2
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U syncline syncline_test
    nats_port=$(free_port)
    # A second free port for NATS: the first may have been taken by now.
    while [[ "$nats_port" == "$pg_port" ]]; do nats_port=$((nats_port + 1)); done
    mkdir -p "$dir/nats"
    echo "$nats_port" >"$dir/nats/port"
    start_nats "$dir"
    echo "export SYNCLINE_TEST_POSTGRES='postgres://syncline@127.0.0.1:$pg_port/syncline_test'"
    echo "export SYNCLINE_TEST_NATS='nats://127.0.0.1:$nats_port'"
    echo "export SYNCLINE_TEST_PG_BIN='$bin' SYNCLINE_TEST_PG_DATA='$dir/pg/data'"
    echo "export SYNCLINE_TEST_SERVICES='$dir'"
    ;;
restart-nats)
    pid=$(cat "$dir/nats/pid")
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
    start_nats "$dir"
    ;;
stop)
    [[ -d "$dir" ]] || exit 0
    if [[ -f "$dir/nats/pid" ]]; then
        kill "$(cat "$dir/nats/pid")" 2>/dev/null || true
    fi
    if [[ -d "$dir/pg/data" ]]; then
        as_owner "$(pg_bin)/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: services.sh start|restart-nats|stop DIR" >&2
    exit 2
    ;;
esac
