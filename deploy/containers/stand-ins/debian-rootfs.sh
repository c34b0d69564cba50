#!/usr/bin/env bash
# TEST STAND-IN (see README.md here): a `debian:bookworm-slim` root file system from Debian's
# mirror, for machines that cannot pull images.
#
#   debian-rootfs.sh DIR [MIRROR]       then: tar -C DIR -c . | podman import - debian:bookworm-slim
#
# Like the official slim image: minbase, no documentation, man pages or locales (also for
# packages installed later), apt lists and archives removed.
set -euo pipefail
dir="$1"
mirror="${2:-http://deb.debian.org/debian}"
security="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
debootstrap --variant=minbase bookworm "$dir" "$mirror"
cat >"$dir/etc/dpkg/dpkg.cfg.d/docker" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CONF
cat >"$dir/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
printf 'Acquire::Languages "none";\n' >"$dir/etc/apt/apt.conf.d/docker-no-languages"
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
    "$mirror" "$mirror" "$security" \
    >"$dir/etc/apt/sources.list"
find "$dir/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$dir"/usr/share/{man,info,groff,lintian,linda}/* "$dir"/var/cache/apt/archives/*.deb \
    "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/* "$dir"/var/log/*.log \
    "$dir"/var/cache/debconf/*-old
: >"$dir/etc/resolv.conf"
printf 'localhost\n' >"$dir/etc/hostname"
