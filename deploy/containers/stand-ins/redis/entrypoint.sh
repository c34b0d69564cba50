#!/bin/sh
# TEST STAND-IN entrypoint (see ../README.md): as the official redis image's docker-entrypoint.sh,
# `redis-server` runs as the user redis; the official binary is built with protected mode off
# (it listens to other containers without a password), Debian's is not, hence the flag.
set -eu

case "${1:-}" in
    -*|*.conf) set -- redis-server "$@" ;;
esac

if [ "${1:-}" = redis-server ]; then
    shift
    if [ -n "${1:-}" ] && [ "${1#-}" = "$1" ]; then
        conf="$1"; shift
        set -- redis-server "$conf" --protected-mode no "$@"
    else
        set -- redis-server --protected-mode no "$@"
    fi
    if [ "$(id -u)" = 0 ]; then
        chown redis:redis /data 2>/dev/null || true
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi

exec "$@"
