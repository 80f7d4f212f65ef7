#!/usr/bin/env bash
# Comparison benchsuite: weighbridge against HAProxy (mode tcp, without and with splice), nginx
# (stream module) and no balancer at all (DIRECT, the limit), all on this machine over 127.0.0.1.
#
#   bash benches/compare/run.sh              # full run: REPS=5, 5 s per load run (~12 min, 2 cores)
#   QUICK=1 bash benches/compare/run.sh      # smoke run: 2 reps, 1 s runs (< 2 min once built)
#   AA=1 bash benches/compare/run.sh         # A/A: HAProxy against an identical HAProxy (noise floor)
#   WB_COPY=1 bash benches/compare/run.sh    # one more column: weighbridge with splice = false
#   WB_CC=cubic bash benches/compare/run.sh  # one more column: weighbridge with
#                                            #   backend_congestion_control = "cubic"
#   WB_PP=1 bash benches/compare/run.sh      # one more column: weighbridge with send_proxy = "v1"
#                                            #   toward HTTP backends that take the header
#                                            #   (nginx `listen ... proxy_protocol`)
#   TCP_CC=cubic bash benches/compare/run.sh # every socket on another congestion control (root)
#   WB_BASE=/path/to/weighbridge bash benches/compare/run.sh
#                                            # before/after: one more column, WEIGHBRIDGE_BASE,
#                                            #   that binary with the same config as WEIGHBRIDGE
#
# Knobs (environment): REPS, DURATION (seconds per iperf3/wrk run), PP_COUNT (ping-pong messages
# per run), IDLE_CONNS, BACKENDS (2-4), CPS_CONNS, OUT_DIR, KEEP_TMP=1, SKIP_INSTALL=1, TCP_CC,
# WB_CC, WB_BASE.
#
# TCP_CC sets the machine's default TCP congestion control (net.ipv4.tcp_congestion_control) for
# the run and puts it back at exit. It applies to every socket of every system alike. It matters
# on loopback: BBR paces each socket with a high-resolution timer, and a balancer is two paced
# hops where DIRECT is one. The report names the one that was in force. WB_CC instead leaves the
# machine alone and adds a column, WEIGHBRIDGE_CC, that sets it on weighbridge's backend sockets
# only (its `backend_congestion_control` key).
#
# WB_BASE compares two builds of weighbridge in one run: the one built here (WEIGHBRIDGE, the
# "after") and a binary built elsewhere, e.g. from a worktree of an older commit (WEIGHBRIDGE_BASE,
# the "before"):
#
#   git worktree add --detach ../wb-base <commit> && (cd ../wb-base && cargo build --release)
#   WB_BASE=../wb-base/target/release/weighbridge REPS=6 bash benches/compare/run.sh
#
# Both get the very same generated config and flags (a key or flag that only one of the two
# builds knows is left out for both), and both binaries are copied aside at the start, so a
# rebuild of either tree during the run changes nothing measured. Within the usual rotation the
# pair's order alternates round by round, so each runs first of the two equally often (with an
# even REPS). The ratio columns are then WEIGHBRIDGE/WEIGHBRIDGE_BASE only, and the report adds
# every round's paired ratio, to tell a change from noise. WB_BASE set to the binary built here
# (target/release/weighbridge) measures weighbridge against itself: the noise floor for those
# ratios.
#
# It installs what is missing (Debian/apt, as root), builds weighbridge in release mode, starts
# every backend and balancer itself on free 127.0.0.1 ports, runs every workload for every system
# in each round (rotating the order each round so drift and position cancel), prints one markdown
# table of medians plus weighbridge's paired per-round ratios, and stops everything it started.
# Raw per-round values and the generated configs are kept under OUT_DIR.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=(python3 "$HERE/bench.py")

# ------------------------------------------------------------------------------------ settings
QUICK=${QUICK:-0}
AA=${AA:-0}
WB_COPY=${WB_COPY:-0}
WB_CC=${WB_CC:-}
WB_PP=${WB_PP:-0}
TCP_CC=${TCP_CC:-}
WB_BASE=${WB_BASE:-}
CC_SYSCTL=/proc/sys/net/ipv4/tcp_congestion_control
if [[ $QUICK == 1 ]]; then
    REPS=${REPS:-2}
    DURATION=${DURATION:-1}
    PP_COUNT=${PP_COUNT:-2000}
    GAP=${GAP:-0.2}
else
    REPS=${REPS:-5}
    DURATION=${DURATION:-5}
    PP_COUNT=${PP_COUNT:-20000}
    GAP=${GAP:-0.5}
fi
IDLE_CONNS=${IDLE_CONNS:-5000}
BACKENDS=${BACKENDS:-2}
CPS_CONNS=${CPS_CONNS:-64}
KA_CONNS=64
NPROC=$(nproc)
# Open-file limit asked for; what we get (containers may cap the hard limit) sets MAXCONN, the
# connection limit given to every balancer, in raise_nofile.
NOFILE=65536
MAXCONN=20000
NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}
OUT_DIR=${OUT_DIR:-$ROOT/target/bench-compare/$(date +%Y%m%d-%H%M%S)}

if [[ $AA == 1 ]]; then
    # Two identical HAProxy instances: their ratio shows how far apart equal things measure.
    SYSTEMS=(DIRECT HAPROXY HAPROXY_B)
    SUBJECT=HAPROXY_B
    BASELINES=HAPROXY
else
    SYSTEMS=(DIRECT HAPROXY HAPROXY_SPLICE NGINX WEIGHBRIDGE)
    SUBJECT=WEIGHBRIDGE
    BASELINES=HAPROXY,HAPROXY_SPLICE,NGINX
    # weighbridge with splice off (every byte copied through user space): a column of its own,
    # outside the ratios and targets, which are about weighbridge as configured by default.
    if [[ $WB_COPY == 1 ]]; then SYSTEMS+=(WEIGHBRIDGE_COPY); fi
    # The same for a congestion control on weighbridge's backend sockets.
    if [[ -n $WB_CC ]]; then SYSTEMS+=(WEIGHBRIDGE_CC); fi
    # weighbridge writing a PROXY header to the HTTP backends (the only ones that read it).
    if [[ $WB_PP == 1 ]]; then SYSTEMS+=(WEIGHBRIDGE_PP); fi
    # Before/after: the other build, next to WEIGHBRIDGE (which of the two goes first alternates
    # by round, see the run loop), and the one baseline of the ratio columns.
    if [[ -n $WB_BASE ]]; then
        SYSTEMS=(DIRECT HAPROXY HAPROXY_SPLICE NGINX WEIGHBRIDGE WEIGHBRIDGE_BASE "${SYSTEMS[@]:5}")
        BASELINES=WEIGHBRIDGE_BASE
    fi
fi
if [[ -n $WB_BASE ]]; then
    if [[ $AA == 1 ]]; then echo "WB_BASE and AA=1 are separate runs" >&2; exit 2; fi
    [[ -f $WB_BASE && -x $WB_BASE ]] || { echo "WB_BASE=$WB_BASE: not an executable file" >&2; exit 2; }
    WB_BASE=$(realpath "$WB_BASE")
fi
(( BACKENDS >= 2 && BACKENDS <= 4 )) || { echo "BACKENDS must be 2..4" >&2; exit 2; }
(( REPS >= 1 && REPS <= 50 )) || { echo "REPS must be 1..50" >&2; exit 2; }

# Every background service also runs under `timeout`, so even a killed script cannot leave one
# running for long: the budget is generous against the expected run time.
SAFETY=$(( 600 + REPS * ${#SYSTEMS[@]} * (4 * (DURATION + 5) + 60) ))

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------------ processes and cleanup
PIDS=()            # one `timeout` wrapper per background service; each leads its process group
ALL_PORTS=()       # every port this run listens on, checked again at exit
CREATED_POLICY=0   # whether we wrote /usr/sbin/policy-rc.d and must remove it
CC_BEFORE=""       # the congestion control TCP_CC replaced, put back at exit
WORK=""
FAILURES=0

group_alive() {    # does process group $1 still have a live (non-zombie) member?
    ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { f = 1 } END { exit !f }'
}
pid_alive() {      # is process $1 alive (not a zombie)? Right after start its group may not exist yet.
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $st != Z* ]]
}

cleanup() {
    local rc=$? pid i any p
    trap - EXIT INT TERM
    set +e
    # `timeout` puts itself and its command in a new process group: signal the whole group so
    # nginx workers and any other children go too.
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
    for (( i = 0; i < 100; i++ )); do            # at most 10 s for a graceful stop
        any=0
        for pid in "${PIDS[@]}"; do { group_alive "$pid" || pid_alive "$pid"; } && any=1; done
        (( any )) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        if group_alive "$pid" || pid_alive "$pid"; then
            log "process group $pid did not stop on SIGTERM; killing it"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    if (( CREATED_POLICY )); then rm -f /usr/sbin/policy-rc.d; fi
    if [[ -n $CC_BEFORE ]] && ! echo "$CC_BEFORE" >"$CC_SYSCTL"; then
        log "warning: could not put net.ipv4.tcp_congestion_control back to $CC_BEFORE"
        rc=1
    fi
    for p in "${ALL_PORTS[@]}"; do
        if [[ -n $(ss -Hltn "sport = :$p" 2>/dev/null) ]]; then
            log "warning: port $p is still listening after cleanup"
            rc=1
        fi
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if (( rc != 0 )) || [[ ${KEEP_TMP:-0} == 1 ]]; then
            log "logs and configs kept in $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_bg NAME CMD...: runs CMD in the background under `timeout`; sets LAST_PID.
start_bg() {
    local name=$1
    shift
    timeout -k 5 "$SAFETY" "$@" >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# wait_listening NAME PID PORT...: up to 10 s for every PORT to be listening while PID lives.
wait_listening() {
    local name=$1 pid=$2 i p missing
    shift 2
    for (( i = 0; i < 100; i++ )); do
        pid_alive "$pid" || { tail -n 20 "$WORK/$name.log" >&2; die "$name exited at start"; }
        missing=0
        for p in "$@"; do
            [[ -n $(ss -Hltn "sport = :$p") ]] || missing=1
        done
        (( missing )) || return 0
        sleep 0.1
    done
    tail -n 20 "$WORK/$name.log" >&2
    die "$name is not listening on $* after 10 s"
}

# ------------------------------------------------------------------------------- dependencies
install_missing() {
    local pkgs=()
    command -v haproxy >/dev/null || pkgs+=(haproxy)
    command -v nginx >/dev/null || pkgs+=(nginx)
    [[ -f $NGINX_STREAM_MODULE ]] || pkgs+=(libnginx-mod-stream)
    command -v iperf3 >/dev/null || pkgs+=(iperf3)
    command -v wrk >/dev/null || pkgs+=(wrk)
    command -v ss >/dev/null || pkgs+=(iproute2)
    command -v ps >/dev/null || pkgs+=(procps)
    command -v python3 >/dev/null || pkgs+=(python3)
    (( ${#pkgs[@]} )) || return 0
    if [[ ${SKIP_INSTALL:-0} == 1 || $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        die "missing: ${pkgs[*]} (Debian: apt-get install ${pkgs[*]})"
    fi
    log "installing ${pkgs[*]}"
    # Debian's nginx/haproxy packages start their system services on install; a system nginx on
    # :80 would outlive this script. A policy-rc.d that says "no" prevents it (only if none exists).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        CREATED_POLICY=1
    fi
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 \
        apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
    if (( CREATED_POLICY )); then rm -f /usr/sbin/policy-rc.d; CREATED_POLICY=0; fi
}

raise_nofile() {
    # Each idle connection costs the balancer two descriptors and the client and backend one each.
    local hard need=$(( 2 * IDLE_CONNS + 1000 ))
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && (( hard < NOFILE )); then
        ulimit -Hn "$NOFILE" 2>/dev/null || true   # root may raise the hard limit
        hard=$(ulimit -Hn)
    fi
    if [[ $hard == unlimited ]] || (( hard >= NOFILE )); then
        ulimit -Sn "$NOFILE"
    else
        ulimit -Sn "$hard"
    fi
    NOFILE=$(ulimit -Sn)
    (( NOFILE >= need )) ||
        die "open-file limit $NOFILE < $need: run as root or lower IDLE_CONNS"
    # Every balancer gets the same connection limit: as many proxied connections as the limit
    # allows, up to 20000, and above IDLE_CONNS, so the limit is never what is measured. HAProxy
    # refuses to start unless its limit covers two descriptors per connection plus, with splice,
    # two per pipe (maxpipes defaults to maxconn/4): 2.5 per connection.
    local fit=$(( (NOFILE - 500) * 2 / 5 ))
    MAXCONN=$(( fit < 20000 ? fit : 20000 ))
    (( MAXCONN > IDLE_CONNS + 100 )) ||
        die "open-file limit $NOFILE is too low for IDLE_CONNS=$IDLE_CONNS; lower IDLE_CONNS"
}

set_congestion_control() {
    local now available=/proc/sys/net/ipv4/tcp_available_congestion_control
    [[ -n $TCP_CC ]] || return 0
    now=$(cat "$CC_SYSCTL" 2>/dev/null) || die "TCP_CC needs $CC_SYSCTL (Linux)"
    [[ $TCP_CC != "$now" ]] || return 0
    grep -qw -- "$TCP_CC" "$available" || die "TCP_CC=$TCP_CC: not one of $(cat "$available")"
    (( EUID == 0 )) || die "TCP_CC needs root (it sets net.ipv4.tcp_congestion_control)"
    CC_BEFORE=$now
    echo "$TCP_CC" >"$CC_SYSCTL" || die "cannot set net.ipv4.tcp_congestion_control to $TCP_CC"
    log "TCP congestion control: $TCP_CC for this run (was $CC_BEFORE)"
}

install_missing
set_congestion_control
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (https://rustup.rs)"
# The revision measured, taken when it is built (the tree may move on while the run goes).
WB_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || WB_REV+="+dirty"
log "building weighbridge $WB_REV (release)"
( cd "$ROOT" && timeout 1800 cargo build --release >&2 )
WB="$ROOT/target/release/weighbridge"
[[ -x $WB ]] || die "$WB not built"
raise_nofile

WORK=$(mktemp -d /tmp/weighbridge-compare.XXXXXX)
chmod 755 "$WORK"   # nginx workers run as an unprivileged user when started as root

# WB_BASE: both binaries are copied aside, so a rebuild of either tree while the run goes (every
# round starts fresh instances for the idle test) cannot change what is measured.
WB_BASE_DESC=""
if [[ -n $WB_BASE ]]; then
    mkdir -p "$WORK/bin"
    cp "$WB" "$WORK/bin/weighbridge"
    cp "$WB_BASE" "$WORK/bin/weighbridge-base"
    WB_BASE_SRC=$WB_BASE
    WB="$WORK/bin/weighbridge"
    WB_BASE="$WORK/bin/weighbridge-base"
    # Its revision, if it was built in a git tree (the HEAD of that tree, as for WEIGHBRIDGE).
    WB_BASE_REV="?"
    if base_top=$(git -C "$(dirname "$WB_BASE_SRC")" rev-parse --show-toplevel 2>/dev/null) &&
        [[ $WB_BASE_SRC == "$base_top"/* ]]; then
        WB_BASE_REV=$(git -C "$base_top" rev-parse --short HEAD 2>/dev/null || echo '?')
        git -C "$base_top" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || WB_BASE_REV+="+dirty"
        if [[ -n $(find "$base_top/src" "$base_top/Cargo.toml" "$base_top/Cargo.lock" \
            -newer "$WB_BASE_SRC" -print -quit 2>/dev/null) ]]; then
            log "warning: WB_BASE is older than some of its sources: rebuild it (cargo build --release in $base_top)"
            WB_BASE_REV+=" (binary older than its sources)"
        fi
    fi
    WB_BASE_DESC="weighbridge $WB_BASE_REV ($WB_BASE_SRC, sha256 $(sha256sum "$WB_BASE" | cut -c1-12))"
    if cmp -s "$WB" "$WB_BASE"; then
        WB_BASE_DESC+=", the same binary as WEIGHBRIDGE: an A/A run"
    fi
    log "WEIGHBRIDGE_BASE: $WB_BASE_DESC"
fi

# --------------------------------------------------------------------------------- ports
# Each balancer listens on four ports: bulk (-> iperf3), http (-> the nginx HTTP backends), echo
# (-> the echo backends) and idle (-> the echo backends, for a fresh instance per idle test).
declare -A PORT_BULK PORT_HTTP PORT_ECHO PORT_IDLE ROOTPID
n_balancers=$(( ${#SYSTEMS[@]} - 1 ))
n_ports=$(( 1 + 3 * BACKENDS + 4 * n_balancers ))
free_ports=$(timeout 10 "${PY[@]}" ports "$n_ports")
read -r -a FREE <<<"$free_ports"
(( ${#FREE[@]} == n_ports )) || die "asked for $n_ports free ports, got '${free_ports}'"
ALL_PORTS=("${FREE[@]}")
IPERF_PORT=${FREE[0]}
HTTP_PORTS=("${FREE[@]:1:BACKENDS}")
ECHO_PORTS=("${FREE[@]:$(( 1 + BACKENDS )):BACKENDS}")
# The same nginx HTTP backends, on ports that expect a PROXY header first (WEIGHBRIDGE_PP).
HTTP_PP_PORTS=("${FREE[@]:$(( 1 + 2 * BACKENDS )):BACKENDS}")
next=$(( 1 + 3 * BACKENDS ))
for sys in "${SYSTEMS[@]}"; do
    if [[ $sys == DIRECT ]]; then
        # No balancer: the client talks to the (first) backend itself.
        PORT_BULK[$sys]=$IPERF_PORT
        PORT_HTTP[$sys]=${HTTP_PORTS[0]}
        PORT_ECHO[$sys]=${ECHO_PORTS[0]}
        continue
    fi
    PORT_BULK[$sys]=${FREE[next]}
    PORT_HTTP[$sys]=${FREE[next + 1]}
    PORT_ECHO[$sys]=${FREE[next + 2]}
    PORT_IDLE[$sys]=${FREE[next + 3]}
    next=$(( next + 4 ))
done

# ------------------------------------------------------------------------------------ backends
# iperf3 needs its control and data connections on the same server, so the bulk listeners
# balance over this single backend.
start_bg iperf3 iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT"
IPERF_PID=$LAST_PID

# HTTP backends: one nginx answering `200 ok` from memory on BACKENDS ports; about the cheapest
# HTTP server there is, so the balancer rather than the backend limits the request rates.
mkdir -p "$WORK/http"
{
    echo "worker_processes $NPROC;"
    echo "worker_rlimit_nofile $NOFILE;"
    echo "pid $WORK/http/nginx.pid;"
    echo "error_log $WORK/http/error.log error;"
    echo "daemon off;"
    echo "events { worker_connections $MAXCONN; }"
    echo "http {"
    echo "    access_log off;"
    # The default (1000) would close each keep-alive connection every 1000 requests.
    echo "    keepalive_requests 1000000;"
    for d in client_body proxy fastcgi uwsgi scgi; do
        echo "    ${d}_temp_path $WORK/http/$d;"
    done
    echo "    server {"
    for p in "${HTTP_PORTS[@]}"; do echo "        listen 127.0.0.1:$p;"; done
    for p in "${HTTP_PP_PORTS[@]}"; do echo "        listen 127.0.0.1:$p proxy_protocol;"; done
    # shellcheck disable=SC2028  # the \n is nginx's, written literally
    echo '        location / { return 200 "ok\n"; }'
    echo "    }"
    echo "}"
} >"$WORK/http/nginx.conf"
timeout 10 nginx -t -q -p "$WORK/http" -c "$WORK/http/nginx.conf" -e "$WORK/http/error.log" >&2
start_bg http-backend nginx -p "$WORK/http" -c "$WORK/http/nginx.conf" -e "$WORK/http/error.log"
HTTP_PID=$LAST_PID

# Echo backends (ping-pong and idle connections): one epoll process, BACKENDS ports.
start_bg echo-backend "${PY[@]}" echo "$(IFS=,; echo "${ECHO_PORTS[*]}")"
ECHO_PID=$LAST_PID

wait_listening iperf3 "$IPERF_PID" "$IPERF_PORT"
wait_listening http-backend "$HTTP_PID" "${HTTP_PORTS[@]}" "${HTTP_PP_PORTS[@]}"
wait_listening echo-backend "$ECHO_PID" "${ECHO_PORTS[@]}"

# ----------------------------------------------------------------------------------- balancers
# Every balancer: round robin over the same backends, NPROC threads/workers, no logging beyond
# errors, connect timeout 2 s, idle timeout 10 min, connection limit MAXCONN.
# A balancer instance is given listeners as KIND:PORT, KIND one of bulk, http, echo.

backend_ports() {   # the backend ports behind a listener kind
    case $1 in
        bulk) echo "$IPERF_PORT" ;;
        http) echo "${HTTP_PORTS[*]}" ;;
        echo) echo "${ECHO_PORTS[*]}" ;;
    esac
}

write_haproxy() {   # write_haproxy FILE SPLICE(0|1) KIND:PORT...
    local f=$1 splice=$2 l kind port b i
    shift 2
    {
        echo "global"
        echo "    nbthread $NPROC"
        echo "    maxconn $MAXCONN"
        echo "    # no 'log' line: HAProxy logs nothing"
        echo "defaults"
        echo "    mode tcp"
        echo "    balance roundrobin"
        # A frontend's own maxconn is otherwise lower than the global one.
        echo "    maxconn $MAXCONN"
        echo "    timeout connect 2s"
        echo "    timeout client 10m"
        echo "    timeout server 10m"
        if (( splice )); then
            echo "    option splice-request"
            echo "    option splice-response"
        fi
        for l in "$@"; do
            kind=${l%%:*} port=${l#*:} i=0
            echo "listen $kind"
            echo "    bind 127.0.0.1:$port"
            for b in $(backend_ports "$kind"); do
                echo "    server s$i 127.0.0.1:$b"
                i=$(( i + 1 ))
            done
        done
    } >"$f"
}

write_nginx() {     # write_nginx DIR KIND:PORT...
    local d=$1 l kind port b
    shift
    {
        if [[ -f $NGINX_STREAM_MODULE ]]; then echo "load_module $NGINX_STREAM_MODULE;"; fi
        echo "worker_processes $NPROC;"
        echo "worker_rlimit_nofile $NOFILE;"
        echo "pid $d/nginx.pid;"
        echo "error_log $d/error.log error;"
        echo "daemon off;"
        # A proxied connection counts twice against worker_connections (client + upstream).
        echo "events { worker_connections $(( 2 * MAXCONN < NOFILE ? 2 * MAXCONN : NOFILE )); }"
        echo "stream {"
        echo "    proxy_connect_timeout 2s;"
        echo "    proxy_timeout 10m;"
        for l in "$@"; do
            kind=${l%%:*} port=${l#*:}
            echo "    upstream $kind {"
            for b in $(backend_ports "$kind"); do echo "        server 127.0.0.1:$b;"; done
            echo "    }"
            echo "    server { listen 127.0.0.1:$port; proxy_pass $kind; }"
        done
        echo "}"
    } >"$d/nginx.conf"
}

# write_weighbridge FILE SPLICE CC PP KIND:PORT...: SPLICE ''|true|false, CC a congestion
# control for the backend sockets; '' leaves either at weighbridge's default. PP 1: the http
# listener sends a v1 PROXY header, to the backend ports that expect one.
write_weighbridge() {
    local f=$1 splice=$2 cc=$3 pp=$4 l kind port b backends
    shift 4
    {
        echo 'shutdown_grace = "1s"'
        if (( WB_THREADS )); then echo "threads = $NPROC"; fi
        for l in "$@"; do
            kind=${l%%:*} port=${l#*:}
            echo
            echo "[[listener]]"
            echo "name = \"$kind\""
            echo "bind = \"127.0.0.1:$port\""
            echo 'strategy = "weighted_round_robin"'
            echo 'connect_timeout = "2s"'
            echo 'idle_timeout = "10m"'
            echo "max_connections = $MAXCONN"
            if [[ -n $splice ]]; then echo "splice = $splice"; fi
            if [[ -n $cc ]]; then echo "backend_congestion_control = \"$cc\""; fi
            backends=$(backend_ports "$kind")
            if [[ $pp == 1 && $kind == http ]]; then
                echo 'send_proxy = "v1"'
                backends="${HTTP_PP_PORTS[*]}"
            fi
            for b in $backends; do
                printf '[[listener.backend]]\naddr = "127.0.0.1:%s"\n' "$b"
            done
        done
    } >"$f"
}

# --log-level error matches the others' "errors only"; --no-watch because HAProxy and nginx do
# not watch their files either. Each is passed only if this build has the flag, so older builds
# can be compared too. With WB_BASE, only if both builds have it: both run the same command line.
WB_HELP=$(timeout 10 "$WB" --help)
if [[ -n $WB_BASE ]]; then WB_BASE_HELP=$(timeout 10 "$WB_BASE" --help); else WB_BASE_HELP=$WB_HELP; fi
WB_FLAGS=()
for flag in --log-level --no-watch; do
    if grep -q -- "$flag" <<<"$WB_HELP" && grep -q -- "$flag" <<<"$WB_BASE_HELP"; then
        case $flag in
            --log-level) WB_FLAGS+=(--log-level error) ;;
            *) WB_FLAGS+=("$flag") ;;
        esac
    elif grep -q -- "$flag" <<<"$WB_HELP$WB_BASE_HELP"; then
        log "$flag: only one of WEIGHBRIDGE and WEIGHBRIDGE_BASE has it; left out for both"
    fi
done
# Worker threads = NPROC like the others: explicit where the build has the `threads` key (it
# rejects unknown keys, so ask --check); its default is one per core anyway. Everything else
# stays at weighbridge's defaults, `splice` included (only the WEIGHBRIDGE_COPY column sets
# it, and only WEIGHBRIDGE_CC sets backend_congestion_control).
WB_THREADS=0
printf 'threads = %s\n[[listener]]\nname = "p"\nbind = "127.0.0.1:0"\n[[listener.backend]]\naddr = "127.0.0.1:9"\n' \
    "$NPROC" >"$WORK/threads-probe.toml"
if timeout 10 "$WB" --config "$WORK/threads-probe.toml" --check >/dev/null 2>&1 &&
    { [[ -z $WB_BASE ]] ||
        timeout 10 "$WB_BASE" --config "$WORK/threads-probe.toml" --check >/dev/null 2>&1; }; then
    WB_THREADS=1
fi
# WB_CC: fail now, with weighbridge's own message, rather than at the first WEIGHBRIDGE_CC start.
if [[ -n $WB_CC ]]; then
    [[ $WB_CC =~ ^[a-z0-9_-]{1,15}$ ]] || die "WB_CC=$WB_CC: not a congestion control name"
    printf '[[listener]]\nname = "p"\nbind = "127.0.0.1:0"\nbackend_congestion_control = "%s"\n[[listener.backend]]\naddr = "127.0.0.1:9"\n' \
        "$WB_CC" >"$WORK/cc-probe.toml"
    timeout 10 "$WB" --config "$WORK/cc-probe.toml" --check >/dev/null || die "WB_CC=$WB_CC: refused (above)"
    if [[ $WB_CC == "$(cat "$CC_SYSCTL" 2>/dev/null)" ]]; then
        log "WB_CC=$WB_CC is the machine's default already: WEIGHBRIDGE_CC will measure the same as WEIGHBRIDGE"
    fi
fi

# start_balancer INSTANCE SYSTEM KIND:PORT...: config in $WORK/INSTANCE/, validated, started,
# listening; sets LAST_PID (the `timeout` wrapper leading the instance's process group).
start_balancer() {
    local inst=$1 sys=$2 d="$WORK/$1" l splice cc pp bin
    shift 2
    mkdir -p "$d"
    case $sys in
        HAPROXY | HAPROXY_B | HAPROXY_SPLICE)
            write_haproxy "$d/haproxy.cfg" "$([[ $sys == HAPROXY_SPLICE ]] && echo 1 || echo 0)" "$@"
            timeout 10 haproxy -c -q -f "$d/haproxy.cfg" >&2
            start_bg "$inst" haproxy -db -f "$d/haproxy.cfg"
            ;;
        NGINX)
            write_nginx "$d" "$@"
            timeout 10 nginx -t -q -p "$d" -c "$d/nginx.conf" -e "$d/error.log" >&2
            start_bg "$inst" nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log"
            ;;
        WEIGHBRIDGE | WEIGHBRIDGE_COPY | WEIGHBRIDGE_CC | WEIGHBRIDGE_PP | WEIGHBRIDGE_BASE)
            splice="" cc="" pp=0 bin=$WB
            if [[ $sys == WEIGHBRIDGE_COPY ]]; then splice=false; fi
            if [[ $sys == WEIGHBRIDGE_CC ]]; then cc=$WB_CC; fi
            if [[ $sys == WEIGHBRIDGE_PP ]]; then pp=1; fi
            # The other build, with the config WEIGHBRIDGE gets (its own ports aside).
            if [[ $sys == WEIGHBRIDGE_BASE ]]; then bin=$WB_BASE; fi
            write_weighbridge "$d/weighbridge.toml" "$splice" "$cc" "$pp" "$@"
            timeout 10 "$bin" --config "$d/weighbridge.toml" --check >/dev/null ||
                die "$sys refuses its config $d/weighbridge.toml (above)"
            start_bg "$inst" "$bin" --config "$d/weighbridge.toml" "${WB_FLAGS[@]}"
            ;;
        *) die "unknown system $sys" ;;
    esac
    local pid=$LAST_PID ports=()
    for l in "$@"; do ports+=("${l#*:}"); done
    wait_listening "$inst" "$pid" "${ports[@]}"
    LAST_PID=$pid
}

# stop_group PID: SIGTERM to the process group, at most 10 s to exit, then SIGKILL.
stop_group() {
    local pid=$1 i
    kill -TERM -- "-$pid" 2>/dev/null || true
    for (( i = 0; i < 100; i++ )); do
        group_alive "$pid" || break
        sleep 0.1
    done
    if group_alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

for sys in "${SYSTEMS[@]}"; do
    [[ $sys == DIRECT ]] && continue
    start_balancer "$sys" "$sys" "bulk:${PORT_BULK[$sys]}" "http:${PORT_HTTP[$sys]}" \
        "echo:${PORT_ECHO[$sys]}"
    ROOTPID[$sys]=$LAST_PID
done
log "all up: systems ${SYSTEMS[*]}; backends iperf3 :$IPERF_PORT, http :${HTTP_PORTS[*]}, echo :${ECHO_PORTS[*]}"

# ----------------------------------------------------------------------------------- workloads
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }
failed() {   # failed REP SYS WHAT LOGFILE: a failed measurement is reported, not fatal
    FAILURES=$(( FAILURES + 1 ))
    log "FAILED: rep $1 $2 $3 (see $4)"
    [[ -f $4 ]] && tail -n 5 "$4" >&2
    return 0
}
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }
cpu_of() { timeout 10 "${PY[@]}" cpu --root "${ROOTPID[$1]}"; }

declare -A CPU_S MACHINE_S BYTES   # per system, summed over the two bulk runs of the round

# machine_cpu: CPU seconds the whole machine has spent so far, every process and the kernel's
# interrupt work (loopback TCP runs there) included: user + nice + system + irq + softirq.
# Read in the shell: the `awk` that does the arithmetic starts after the counters are read.
machine_cpu() {
    local _cpu user nice system _idle _iowait irq softirq _rest
    read -r _cpu user nice system _idle _iowait irq softirq _rest </proc/stat
    calc "($user + $nice + $system + $irq + $softirq) / $CLK_TCK"
}
CLK_TCK=$(getconf CLK_TCK)

bulk() {     # bulk REP SYS STREAMS: iperf3 client -> balancer -> iperf3 server
    local rep=$1 sys=$2 streams=$3 out cpu0=0 cpu1=0 m0 m1 parsed bps bytes
    out="$WORK/iperf-$sys-r$rep-P$streams.json"
    [[ $sys == DIRECT ]] || cpu0=$(cpu_of "$sys")
    m0=$(machine_cpu)
    if ! timeout -k 5 $(( DURATION + 30 )) iperf3 -c 127.0.0.1 -p "${PORT_BULK[$sys]}" \
        -t "$DURATION" -P "$streams" -J --connect-timeout 3000 >"$out" 2>&1; then
        failed "$rep" "$sys" "bulk P$streams" "$out"
        return 0
    fi
    m1=$(machine_cpu)
    [[ $sys == DIRECT ]] || cpu1=$(cpu_of "$sys")
    parsed=$(timeout 10 "${PY[@]}" parse-iperf "$out") ||
        { failed "$rep" "$sys" "bulk P$streams" "$out"; return 0; }
    read -r bps bytes <<<"$parsed"
    record "$rep" "$sys" "bulk${streams}_gbps" "$(calc "$bps / 1e9")"
    CPU_S[$sys]=$(calc "${CPU_S[$sys]:-0} + $cpu1 - $cpu0")
    MACHINE_S[$sys]=$(calc "${MACHINE_S[$sys]:-0} + $m1 - $m0")
    BYTES[$sys]=$(( ${BYTES[$sys]:-0} + bytes ))
    log "rep $rep bulk P$streams $sys: $(calc "$bps / 1e9") Gbit/s"
}

http_load() {   # http_load REP SYS cps|ka: wrk through the balancer to the nginx HTTP backends
    local rep=$1 sys=$2 kind=$3 out parsed rps p50 p99 errors args cpu0=0 cpu1=0
    out="$WORK/wrk-$sys-r$rep-$kind.txt"
    if [[ $kind == cps ]]; then
        # Every request on a new connection: the balancer accepts, connects and tears down each.
        args=(-c "$CPS_CONNS" -H 'Connection: close')
    else
        args=(-c "$KA_CONNS" --latency)
    fi
    [[ $sys == DIRECT ]] || cpu0=$(cpu_of "$sys")
    if ! timeout -k 5 $(( DURATION + 30 )) wrk -t "$NPROC" "${args[@]}" -d "${DURATION}s" \
        --timeout 5s "http://127.0.0.1:${PORT_HTTP[$sys]}/" >"$out" 2>&1; then
        failed "$rep" "$sys" "wrk $kind" "$out"
        return 0
    fi
    [[ $sys == DIRECT ]] || cpu1=$(cpu_of "$sys")
    parsed=$(timeout 10 "${PY[@]}" parse-wrk "$out") ||
        { failed "$rep" "$sys" "wrk $kind" "$out"; return 0; }
    read -r rps p50 p99 errors <<<"$parsed"
    # The balancer's CPU (user + sys, all its threads and processes) per request: far steadier
    # than the rate itself, which also depends on how the load generator and the backends share
    # the cores with it.
    if [[ $sys != DIRECT ]] && awk -v r="$rps" 'BEGIN { exit !(r > 0) }'; then
        record "$rep" "$sys" "${kind}_cpu_us" "$(calc "($cpu1 - $cpu0) / ($rps * $DURATION) * 1e6")"
    fi
    if [[ $kind == cps ]]; then
        record "$rep" "$sys" cps "$rps"
        log "rep $rep cps $sys: $rps conn/s (errors $errors)"
    else
        record "$rep" "$sys" ka_rps "$rps"
        record "$rep" "$sys" ka_p50_us "$p50"
        record "$rep" "$sys" ka_p99_us "$p99"
        log "rep $rep ka $sys: $rps req/s (p50 ${p50} µs, p99 ${p99} µs, errors $errors)"
    fi
    record "$rep" "$sys" "${kind}_errors" "$errors"
}

pingpong() {    # pingpong REP: 64-byte messages, one in flight, through to the echo backends
    # All systems in one client, interleaved in short blocks (see bench.py), so that a change in
    # the machine's state (a compile starting, processes moving between cores) does not land on
    # one system only: that is what makes the DIRECT-relative "added" latency meaningful.
    local rep=$1 out sys p50 p99 labels ports
    out="$WORK/pingpong-r$rep.txt"
    labels=$(IFS=,; echo "${ORDER[*]}")
    ports=$(for sys in "${ORDER[@]}"; do echo "${PORT_ECHO[$sys]}"; done | paste -sd,)
    if ! timeout -k 5 300 "${PY[@]}" pingpong --labels "$labels" --ports "$ports" \
        --count "$PP_COUNT" --size 64 --conns $(( 2 * BACKENDS )) >"$out" 2>&1; then
        failed "$rep" all pingpong "$out"
        return 0
    fi
    while read -r sys p50 p99; do
        record "$rep" "$sys" pp_p50_us "$p50"
        record "$rep" "$sys" pp_p99_us "$p99"
        log "rep $rep ping-pong $sys: p50 $p50 µs, p99 $p99 µs"
    done <"$out"
}

idle_memory() {   # idle_memory REP SYS: RSS delta of the balancer per idle proxied connection
    # On a fresh instance with only the idle listener: a process that already served other
    # workloads may reuse freed memory it kept (HAProxy's pools do), which would hide the cost.
    local rep=$1 sys=$2 out kib inst pid
    [[ $sys == DIRECT ]] && return 0
    inst="$sys-idle-r$rep"
    out="$WORK/idle-$sys-r$rep.txt"
    start_balancer "$inst" "$sys" "echo:${PORT_IDLE[$sys]}"
    pid=$LAST_PID
    sleep 0.5   # let workers finish starting before the baseline RSS is read
    if timeout -k 5 180 "${PY[@]}" idle --port "${PORT_IDLE[$sys]}" --root "$pid" \
        --conns "$IDLE_CONNS" --settle 0.5 --timeout 120 >"$out" 2>&1; then
        kib=$(tail -n 1 "$out")
        record "$rep" "$sys" idle_kib "$kib"
        log "rep $rep idle $sys: $kib KiB per connection"
    else
        failed "$rep" "$sys" idle "$out"
    fi
    stop_group "$pid"   # also gives the next measurement an unloaded machine
}

# --------------------------------------------------------------------------------------- run
# How much CPU other work took while we measured, per round: a number for the noise on a shared
# machine (another build running alongside lowers and scatters every result).
other_cpu_now() { timeout 10 "${PY[@]}" other-cpu --root $$; }
FOREIGN=()
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s)
for (( rep = 1; rep <= REPS; rep++ )); do
    other0=$(other_cpu_now)
    t0=$(date +%s.%N)
    # Rotate the order each round: every system runs in every position, right after a different
    # neighbour, so warm-up, drift and whoever ran just before cancel out over the rounds.
    k=$(( (rep - 1) % ${#SYSTEMS[@]} ))
    ORDER=("${SYSTEMS[@]:k}" "${SYSTEMS[@]:0:k}")
    # WB_BASE: within the rotation, the before/after pair runs in alternating order, WEIGHBRIDGE
    # first in odd rounds and WEIGHBRIDGE_BASE first in even ones (their two places swap when
    # the rotation has them the other way round), so that neither always goes first.
    if [[ -n $WB_BASE ]]; then
        first=WEIGHBRIDGE
        if (( rep % 2 == 0 )); then first=WEIGHBRIDGE_BASE; fi
        for i in "${!ORDER[@]}"; do
            if [[ ${ORDER[i]} == WEIGHBRIDGE || ${ORDER[i]} == WEIGHBRIDGE_BASE ]]; then
                if [[ ${ORDER[i]} != "$first" ]]; then
                    for j in "${!ORDER[@]}"; do
                        [[ ${ORDER[j]} == "$first" ]] && ORDER[j]=${ORDER[i]}
                    done
                    ORDER[i]=$first
                fi
                break
            fi
        done
    fi
    log "round $rep/$REPS: order ${ORDER[*]}"
    CPU_S=()
    MACHINE_S=()
    BYTES=()
    for workload in bulk1 bulk8 cps ka pingpong idle; do
        if [[ $workload == pingpong ]]; then   # one client measures every system, interleaved
            pingpong "$rep"
            sleep "$GAP"
            continue
        fi
        for sys in "${ORDER[@]}"; do
            case $workload in
                bulk1) bulk "$rep" "$sys" 1 ;;
                bulk8) bulk "$rep" "$sys" 8 ;;
                cps) http_load "$rep" "$sys" cps ;;
                ka) http_load "$rep" "$sys" ka ;;
                idle) idle_memory "$rep" "$sys" ;;
            esac
            sleep "$GAP"   # let sockets and CPU settle so one run does not spill into the next
        done
    done
    # CPU seconds the balancer spent (all its processes and threads, user + system) per GB
    # (1e9 bytes) the two bulk runs moved through it.
    # And what the whole machine spent per GB: sender, receiver and balancer together, DIRECT
    # included. A balancer can make its own share small by handing work on: with splice(2) on
    # loopback, the receiving iperf3 copies from pages nobody has touched since the sender
    # wrote them, instead of from a copy the balancer has just made.
    for sys in "${SYSTEMS[@]}"; do
        [[ ${BYTES[$sys]:-0} == 0 ]] && continue
        record "$rep" "$sys" machine_s_per_gb "$(calc "${MACHINE_S[$sys]} / (${BYTES[$sys]} / 1e9)")"
        [[ $sys == DIRECT ]] && continue
        record "$rep" "$sys" cpu_s_per_gb "$(calc "${CPU_S[$sys]} / (${BYTES[$sys]} / 1e9)")"
    done
    other1=$(other_cpu_now)
    t1=$(date +%s.%N)
    share=$(awk -v o="$(calc "$other1 - $other0")" -v w="$(calc "$t1 - $t0")" -v n="$NPROC" \
        'BEGIN { f = o / (w * n) * 100; if (f < 0) f = 0; printf "%.0f%%", f }')
    FOREIGN+=("$share")
    log "round $rep: other processes used $share of the machine's CPU"
done
ELAPSED=$(( $(date +%s) - START ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# -------------------------------------------------------------------------------------- report
mkdir -p "$OUT_DIR"
cp "$RESULTS" "$OUT_DIR/results.tsv"
mkdir -p "$OUT_DIR/configs"
for sys in "${SYSTEMS[@]}" http; do
    [[ -d $WORK/$sys ]] || continue
    for f in "$WORK/$sys"/*.cfg "$WORK/$sys"/*.conf "$WORK/$sys"/*.toml; do
        if [[ -f $f ]]; then cp "$f" "$OUT_DIR/configs/$sys-$(basename "$f")"; fi
    done
done

REPORT="$OUT_DIR/report.md"
{
    if [[ -n $WB_BASE ]]; then
        echo "### weighbridge $WB_REV against weighbridge $WB_BASE_REV (with HAProxy and nginx): L4 proxy on 127.0.0.1"
    else
        echo "### weighbridge vs HAProxy vs nginx: L4 proxy on 127.0.0.1"
    fi
    echo
    echo "- machine: $NPROC cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
    echo "- $(haproxy -v | head -n 1 | awk '{print "HAProxy " $3}'), $(nginx -v 2>&1 | sed 's|.*nginx/|nginx |'), $(iperf3 --version | head -n 1 | awk '{print "iperf3 " $2}'), $(wrk -v 2>&1 | head -n 1 | awk '{print "wrk " $2}'), weighbridge $WB_REV"
    if [[ -n $CC_BEFORE ]]; then
        echo "- TCP congestion control: $(cat "$CC_SYSCTL") (TCP_CC; the machine's default is $CC_BEFORE)"
    else
        echo "- TCP congestion control: $(cat "$CC_SYSCTL" 2>/dev/null || echo unknown) (the machine's default)"
    fi
    if [[ -n $WB_CC ]]; then
        echo "- WEIGHBRIDGE_CC: weighbridge with backend_congestion_control = \"$WB_CC\" (its backend sockets only)"
    fi
    if [[ $WB_PP == 1 ]]; then
        echo "- WEIGHBRIDGE_PP: weighbridge with send_proxy = \"v1\" on its HTTP listener, to the same nginx backends on ports with \`listen ... proxy_protocol\`"
    fi
    if [[ -n $WB_BASE ]]; then
        echo "- WEIGHBRIDGE_BASE: $WB_BASE_DESC; the same config and flags as WEIGHBRIDGE (weighbridge $WB_REV, sha256 $(sha256sum "$WB" | cut -c1-12))"
    fi
    echo "- REPS=$REPS (median of rounds; ratios are medians of per-round paired ratios), ${DURATION}s per iperf3/wrk run, ping-pong $PP_COUNT msgs, $IDLE_CONNS idle connections, $BACKENDS backends, $NPROC threads/workers per balancer; took ${ELAPSED}s"
    echo "- other processes used ${FOREIGN[*]} of the machine's CPU during rounds 1..$REPS; load average (1/5/15 min) before: $LOAD_START, after: $LOAD_END"
    if printf '%s\n' "${FOREIGN[@]}" | tr -d % | awk '$1 > 10 { f = 1 } END { exit !f }'; then
        echo
        echo "**Warning: other work used more than 10% of the CPU in some round; it lowers and scatters every result, latencies most. Compare only runs made on a quiet machine, and see AA=1 for the noise floor.**"
    fi
    echo
    TARGETS=(--targets)   # the targets are weighbridge's; an A/A run has none
    [[ $AA == 1 ]] && TARGETS=()
    if [[ -n $WB_BASE ]]; then TARGETS+=(--pair WEIGHBRIDGE_BASE); fi
    timeout 30 "${PY[@]}" report "$RESULTS" --systems "$(IFS=,; echo "${SYSTEMS[*]}")" \
        --subject "$SUBJECT" --baselines "$BASELINES" "${TARGETS[@]}"
    (( FAILURES == 0 )) || { echo; echo "**$FAILURES measurement(s) failed; see the log above.**"; }
} >"$REPORT"
cat "$REPORT"
log "report: $REPORT (raw values: $OUT_DIR/results.tsv)"
(( FAILURES == 0 )) || exit 1
