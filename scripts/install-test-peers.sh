#!/usr/bin/env bash
# Installs the real programs the tests run: HAProxy, and nginx with its stream module, that
# tests/proxy_interop.rs runs weighbridge against; systemd's tools (systemd-analyze verify on the
# unit) for tests/systemd.rs; Prometheus for its promtool (`promtool check rules` on
# deploy/prometheus/alerts.yml) in tests/dashboards.rs. The tests start their own instances on
# loopback from temporary configs; the system services Debian starts on install are stopped and
# disabled here, so none of them holds a port (80, 9090, or anything else) while the tests run.
#
#   bash scripts/install-test-peers.sh     # as root to install; .ci/run calls it first
#
# Idempotent: packages are installed only when missing, and stopping a stopped service is a no-op.
# Without root it can only check: it exits non-zero naming the packages that are missing.
# Prints the versions found at the end.
set -euo pipefail

NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}
SERVICES=(haproxy nginx prometheus)

log() { printf 'install-test-peers: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The tests look in the same places: a user's PATH often lacks the sbin directories.
find_bin() {
    local dir
    command -v "$1" 2>/dev/null && return 0
    for dir in /usr/sbin /usr/local/sbin /sbin; do
        [[ -x $dir/$1 ]] && { echo "$dir/$1"; return 0; }
    done
    return 1
}

# nginx's stream module is either Debian's dynamic module or built in (`--with-stream`).
has_stream() {
    local nginx
    [[ -f $NGINX_STREAM_MODULE ]] && return 0
    nginx=$(find_bin nginx) || return 1
    "$nginx" -V 2>&1 | grep -Eq -- '--with-stream( |$)'
}

missing() {
    find_bin haproxy >/dev/null || echo haproxy
    find_bin nginx >/dev/null || echo nginx
    has_stream || echo libnginx-mod-stream
    find_bin systemd-analyze >/dev/null || echo systemd
    find_bin promtool >/dev/null || echo prometheus
}

CREATED_POLICY=0
cleanup() { if (( CREATED_POLICY )); then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

install() {
    local pkgs=("$@")
    command -v apt-get >/dev/null || die "missing ${pkgs[*]} and no apt-get to install them"
    log "installing ${pkgs[*]}"
    # Debian's packages start their services on install; a policy-rc.d that says "no" keeps them
    # from starting at all (only if there is none already, and removed again on exit).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        CREATED_POLICY=1
    fi
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 \
        apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
    cleanup
    CREATED_POLICY=0
}

# Where Debian's init script for a service keeps its pid: /run/NAME.pid, or /run/NAME/NAME.pid
# (prometheus).
pid_file() {
    local f
    for f in "/run/$1.pid" "/run/$1/$1.pid"; do
        [[ -r $f ]] && { echo "$f"; return 0; }
    done
    return 1
}

# A service is running if its pid file names a live process (how Debian's init scripts tell).
service_running() {
    local pidfile pid
    pidfile=$(pid_file "$1") || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

# Stops each service and keeps it from starting at boot, under systemd or SysV init alike.
stop_services() {
    local s
    for s in "${SERVICES[@]}"; do
        if [[ -d /run/systemd/system ]]; then
            if systemctl list-unit-files "$s.service" >/dev/null 2>&1; then
                systemctl disable --now "$s.service" >/dev/null 2>&1 ||
                    log "warning: systemctl disable --now $s failed"
            fi
        elif [[ -x /etc/init.d/$s ]]; then
            # The init script fails when there is nothing to stop; that is the state wanted.
            /etc/init.d/"$s" stop >/dev/null 2>&1 || true
            if command -v update-rc.d >/dev/null; then
                update-rc.d "$s" disable >/dev/null 2>&1 || log "warning: update-rc.d $s disable failed"
            fi
        fi
        if service_running "$s"; then
            die "the system $s service is still running (pid $(cat "$(pid_file "$s")")); stop it"
        fi
    done
}

mapfile -t PKGS < <(missing)
if (( ${#PKGS[@]} )); then
    (( EUID == 0 )) || die "missing ${PKGS[*]}: run as root: sudo bash $0 (or apt-get install ${PKGS[*]})"
    install "${PKGS[@]}"
    mapfile -t PKGS < <(missing)
    (( ${#PKGS[@]} == 0 )) || die "still missing after apt-get install: ${PKGS[*]}"
fi

if (( EUID == 0 )); then
    stop_services
else
    for s in "${SERVICES[@]}"; do
        if service_running "$s"; then log "warning: the system $s service runs; as root this script stops it"; fi
    done
fi

HAPROXY=$(find_bin haproxy)
NGINX=$(find_bin nginx)
echo "haproxy: $("$HAPROXY" -v | head -n 1) ($HAPROXY)"
echo "nginx: $("$NGINX" -v 2>&1 | head -n 1) ($NGINX)"
echo "systemd-analyze: $("$(find_bin systemd-analyze)" --version | head -n 1)"
echo "promtool: $("$(find_bin promtool)" --version 2>&1 | head -n 1)"
if [[ -f $NGINX_STREAM_MODULE ]]; then
    echo "nginx stream module: $NGINX_STREAM_MODULE"
else
    echo "nginx stream module: built in"
fi
