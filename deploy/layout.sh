# shellcheck shell=bash
# The port layout of a single-host deployment (native supervisord stack, all-in-one container),
# in one place. Sourced by scripts/stack and deploy/entrypoint.sh (bash); it sets defaults for
# the variables supervisord.conf expands and defines `write_nginx_env DIR`, which writes the
# per-environment part of nginx.conf (see the header of nginx.conf).
#
# Replica N (0, 1, 2, …) of a service listens on PORT + STEP × N: with the defaults api-service
# runs on 8002, 8012, 8022…, the gateway on 8003, 8013…, auth-service on 8001, 8011…
# A service with 0 replicas is not started (supervisord's numprocs=0) and its upstream is
# marked down (NGINX answers 502 there).

: "${NGINX_LISTEN:=8000}"             # NGINX's `listen` argument: a port or address:port
: "${GQLWS_BIND_HOST:=127.0.0.1}"     # address the services listen on
: "${AUTH_PORT:=8001}"
: "${AUTH_PORT_STEP:=10}"
: "${AUTH_REPLICAS:=1}"
: "${API_PORT:=8002}"
: "${API_PORT_STEP:=10}"
: "${API_REPLICAS:=2}"
: "${GATEWAY_PORT:=8003}"
: "${GATEWAY_PORT_STEP:=10}"
: "${GATEWAY_REPLICAS:=2}"
# NGINX's workers (nginx.d/workers.conf, events.conf): how many, their descriptor limit and
# connections each (two per proxied websocket); NGINX_REUSEPORT=1 has the kernel spread new
# connections evenly over the workers (`listen … reuseport`), which many workers near their
# limit need.
: "${NGINX_WORKERS:=auto}"
: "${NGINX_WORKER_NOFILE:=65536}"
: "${NGINX_WORKER_CONNECTIONS:=16384}"
: "${NGINX_REUSEPORT:=0}"
# Descriptors for supervisord and everything it starts (each websocket holds one in the gateway
# and two in NGINX): 65536, or the hard limit when that is lower.
if [ -z "${GQLWS_MINFDS:-}" ]; then
    GQLWS_MINFDS=$(ulimit -Hn)
    if [ "$GQLWS_MINFDS" = unlimited ] || [ "$GQLWS_MINFDS" -gt 65536 ]; then
        GQLWS_MINFDS=65536
    fi
fi
export NGINX_LISTEN GQLWS_BIND_HOST GQLWS_MINFDS \
    NGINX_WORKERS NGINX_WORKER_NOFILE NGINX_WORKER_CONNECTIONS NGINX_REUSEPORT \
    AUTH_PORT AUTH_PORT_STEP AUTH_REPLICAS \
    API_PORT API_PORT_STEP API_REPLICAS \
    GATEWAY_PORT GATEWAY_PORT_STEP GATEWAY_REPLICAS

# replica_ports BASE STEP COUNT: the ports of COUNT replicas, one a line.
replica_ports() {
    local base=$1 step=$2 count=$3 n
    for ((n = 0; n < count; n++)); do
        echo $((base + step * n))
    done
}

# upstream_servers BASE STEP COUNT [PARAMETERS]: `server` lines for an nginx upstream block,
# each with PARAMETERS (default: out for 5 s after a failed attempt).
upstream_servers() {
    local base=$1 step=$2 count=$3 parameters=${4:-max_fails=1 fail_timeout=5s} port
    if [ "$count" -eq 0 ]; then
        # An upstream needs a server; this one is never tried, so NGINX answers 502 at once.
        echo "server $GQLWS_BIND_HOST:$base down;  # no replica configured"
        return
    fi
    for port in $(replica_ports "$base" "$step" "$count"); do
        echo "server $GQLWS_BIND_HOST:$port $parameters;"
    done
}

# write_nginx_env DIR: writes DIR/nginx.d/{workers,events,listen,auth,api,gateway}.conf and links
# DIR/nginx.conf to the repository's (or image's) nginx.conf given as NGINX_CONF, so that
# nginx's `include nginx.d/…` (relative to the configuration file) finds this directory.
write_nginx_env() {
    local dir=$1
    mkdir -p "$dir/nginx.d"
    printf 'worker_processes %s;\nworker_rlimit_nofile %s;\n' "$NGINX_WORKERS" "$NGINX_WORKER_NOFILE" \
        >"$dir/nginx.d/workers.conf"
    echo "worker_connections $NGINX_WORKER_CONNECTIONS;" >"$dir/nginx.d/events.conf"
    if [ "$NGINX_REUSEPORT" = 1 ]; then
        echo "listen $NGINX_LISTEN reuseport;" >"$dir/nginx.d/listen.conf"
    else
        echo "listen $NGINX_LISTEN;" >"$dir/nginx.d/listen.conf"
    fi
    upstream_servers "$AUTH_PORT" "$AUTH_PORT_STEP" "$AUTH_REPLICAS" >"$dir/nginx.d/auth.conf"
    upstream_servers "$API_PORT" "$API_PORT_STEP" "$API_REPLICAS" >"$dir/nginx.d/api.conf"
    # Never out for the gateway: NGINX lets a replica that failed once take one request again
    # after fail_timeout, and counts it good only when that request ends, which for a websocket
    # is hours later. Meanwhile every other upgrade finds no live upstream (502): a replica that
    # restarted, then its peer SIGTERMed, took 1 of 1,000 reconnecting clients (the reconnect
    # storm in docs/BENCHMARKS.md). A stopped replica refuses at once and NGINX goes on to the
    # next (proxy_next_upstream error), so counting failures buys nothing here.
    upstream_servers "$GATEWAY_PORT" "$GATEWAY_PORT_STEP" "$GATEWAY_REPLICAS" "max_fails=0" >"$dir/nginx.d/gateway.conf"
    ln -sfn "$NGINX_CONF" "$dir/nginx.conf"
}
