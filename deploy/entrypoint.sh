#!/usr/bin/env bash
# Entrypoint of the gqlws image (deploy/Dockerfile); scripts/stack calls its `init` too.
#
#   entrypoint.sh init          apply the database migrations (waiting for PostgreSQL), and in
#                               demo mode (DEMO=true) create the user admin/letmein
#   entrypoint.sh all-in-one    init, then every service and NGINX under supervisord, ports as in
#                               deploy/layout.sh (NGINX on :8000); the all-in-one image's default
#   entrypoint.sh CMD [ARGS…]   run CMD, e.g. `auth-service`, `api-service trigger-event`
#
# Car 1 and Car 2 of the demo are created by api-service itself when it starts with DEMO=true
# (idempotent, so every replica may do it); with DEMO=false nothing demo exists.
#
# Environment variables set to an empty string are removed first for the optional settings
# below: docker compose passes `${JWT_SECRET:-}` as an empty value, which the services would
# reject as a malformed secret instead of treating it as unset.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# nginx.conf and supervisord.conf: beside this script in the image, at the root of the repo.
if [ -f "$here/supervisord.conf" ]; then conf_dir="$here"; else conf_dir="$(dirname "$here")"; fi

for name in JWT_SECRET JWT_PRIVATE_KEY_FILE JWT_KEY_ID JWT_VERIFY_KEYS JWT_ACCEPTED_ALGORITHMS \
    JWKS_URL HTTP_WORKERS; do
    if [ -z "${!name-x}" ]; then unset "$name"; fi
done

log() { printf 'entrypoint: %s\n' "$*" >&2; }

init() {
    : "${DATABASE_URL:?DATABASE_URL must be set}"
    log "applying database migrations"
    auth-service migrate
    if [ "${DEMO:-false}" = true ]; then
        local out
        if out="$(printf 'letmein\n' | auth-service create-user --username admin --password-stdin --staff 2>&1)"; then
            log "demo mode: $out (password letmein)"
        elif [[ "$out" == *"already exists"* ]]; then
            log "demo mode: user admin already exists"
        else
            printf '%s\n' "$out" >&2
            return 1
        fi
    fi
}

all_in_one() {
    init
    export GQLWS_RUN_DIR="${GQLWS_RUN_DIR:-/tmp/gqlws}"
    export GQLWS_BIN_DIR="${GQLWS_BIN_DIR:-$(dirname "$(command -v auth-service)")}"
    export NGINX_CONF="$conf_dir/nginx.conf"
    # The services bind to loopback; only NGINX faces the network.
    export GQLWS_BIND_HOST="${GQLWS_BIND_HOST:-127.0.0.1}"
    # init applied the migrations; replicas starting together must not race on them.
    export MIGRATE=false
    [ -x "$GQLWS_BIN_DIR/subscription-gateway" ] || GATEWAY_REPLICAS=0
    # shellcheck source=deploy/layout.sh
    source "$here/layout.sh"
    mkdir -p "$GQLWS_RUN_DIR"
    write_nginx_env "$GQLWS_RUN_DIR/nginx"
    log "starting supervisord: auth x$AUTH_REPLICAS, api x$API_REPLICAS, gateway x$GATEWAY_REPLICAS, NGINX on $NGINX_LISTEN"
    exec supervisord -c "$conf_dir/supervisord.conf"
}

case "${1:-all-in-one}" in
    init) init ;;
    all-in-one) all_in_one ;;
    *) exec "$@" ;;
esac
