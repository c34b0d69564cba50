# Shared by scripts/dev and scripts/test: make sure this (Debian) machine has and runs what the
# stack needs. Source it; every function is idempotent.

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

_apt_updated=0
# need_packages PKG…: installs the Debian packages that are missing.
need_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    if [ $_apt_updated = 0 ]; then as_root apt-get update -qq; _apt_updated=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# ensure_postgres: PostgreSQL accepting connections on 127.0.0.1:5432.
ensure_postgres() {
    need_packages libpq-dev pkg-config
    command -v psql >/dev/null || need_packages postgresql-client
    command -v pg_ctlcluster >/dev/null || need_packages postgresql
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        log "starting PostgreSQL"
        local version
        version="$(ls /etc/postgresql | sort -V | tail -n1)"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
        for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
    fi
    pg_isready -h 127.0.0.1 -p 5432 >/dev/null
}

# ensure_redis URL: Redis answering PING at URL (a local server is started when it does not).
ensure_redis() {
    local url="$1"
    command -v redis-cli >/dev/null || need_packages redis-tools
    command -v redis-server >/dev/null || need_packages redis-server
    if ! redis-cli -u "$url" ping >/dev/null 2>&1; then
        log "starting Redis"
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
            --dir /var/lib/redis --logfile /var/log/redis/ci.log
        for _ in $(seq 1 60); do redis-cli -u "$url" ping >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    redis-cli -u "$url" ping >/dev/null
}
