#!/usr/bin/env bash
# Inference benchmark: how well each balancer spreads generation requests over a heterogeneous
# fleet of GPU servers, measured as the clients see it (time to first token, total time), all on
# this machine over 127.0.0.1.
#
#   bash benches/inference/run.sh                   # full run: 3 seeds, 500 requests per run
#                                                   #   (about 35-45 min on 2 cores)
#   QUICK=1 bash benches/inference/run.sh           # smoke run: 1 seed, 100 requests per run,
#                                                   #   a 10 s overload (3-4 min)
#   SYSTEMS="IDEAL HAPROXY_LC WB_CP" bash benches/inference/run.sh   # only these columns
#   SCENARIOS="MAIN HIDDEN" bash benches/inference/run.sh             # only these scenarios
#   WB=/path/to/weighbridge bash benches/inference/run.sh             # another weighbridge build
#
# The fleet: four mock inference servers (examples/mock_inference.rs) with 3, 4, 2 and 5 slots
# (SLOTS), 14 in all. A server serves as many requests at once as it has slots; the others wait
# inside it, first come first served. Every request says its own service time and token count
# (`/v1/completions?service_ms=S&tokens=K`), drawn in advance for each seed: Poisson arrivals,
# log-normal service times with a 400 ms mean (MEAN_MS, SIGMA), 40 tokens per second of service
# (TOKENS_PER_S). So every system is given the very same requests at the very same instants. A
# server sends the first token after PREFILL (10 %) of the service time and the rest evenly over
# the remaining time; one TCP connection per request (`Connection: close`).
#
# Columns (SYSTEMS), each fed the same sequences:
#   IDEAL            one central FIFO queue in front of all 14 slots, computed from the sequence
#                    (a discrete-event simulation; no network): the best any balancer can do
#   WB_CP            weighbridge, strategy capacity_proportional, weights = slots (inline
#                    [[listener.backend]] form)
#   WB_SLOTS         weighbridge [[pool]], capacity_proportional, every backend's
#                    max_connections = its slots, clients beyond them queued (QUEUE_TIMEOUT)
#   WB_SLOTS_LOAD    WB_SLOTS plus [pool.health.load] scraping the servers' /metrics (vllm
#                    preset, LOAD_INTERVAL)
#   HAPROXY_RR       HAProxy mode tcp, balance roundrobin, weights = slots
#   HAPROXY_LC       HAProxy balance leastconn, weights = slots
#   HAPROXY_MAXCONN  HAProxy leastconn with maxconn = slots per server and its queue
#                    (timeout queue = QUEUE_TIMEOUT)
#   NGINX_LC         nginx stream, least_conn, weights = slots (shared zone across workers)
# WB_SLOTS and WB_SLOTS_LOAD need a weighbridge with [[pool]] tables; a build that refuses
# their configs (`--check`) has those columns left out, and the report says so (STRICT=1 stops
# instead). Their generated configs are kept under OUT_DIR/configs either way.
#
# Scenarios (SCENARIOS):
#   MAIN      offered load ρ = RHOS (0.6 0.8 0.9) of the 14 slots: arrival rate ρ · 14 / 0.4 s.
#             One table per ρ: medians over seeds of p50/p99 TTFT and total time, completed
#             requests and errors, and the p99 TTFT ratio against HAPROXY_LC and against
#             HAPROXY_MAXCONN taken per seed (the same requests), with its median.
#   HIDDEN    the 5-slot server starts with --hidden HIDDEN (3): slots held by a client the
#             balancers never see. ρ = HIDDEN_RHO (0.75) of the 14 slots; IDEAL has 11 slots.
#             Only a balancer that reads the servers' load (WB_SLOTS_LOAD) can see it.
#   REPLICAS  two REPLICAS_SYSTEM (WB_SLOTS_LOAD) processes in front of the same fleet, each
#             taking every other request, against one; ρ = REPLICAS_RHO. Reports the p99 TTFT
#             ratio two/one per seed.
#   OVERLOAD  arrivals at OVERLOAD_FACTOR (3) × capacity for OVERLOAD_SECONDS (60) against each
#             of OVERLOAD_SYSTEMS (WB_SLOTS HAPROXY_MAXCONN), queue timeout
#             OVERLOAD_QUEUE_TIMEOUT (10s), connect timeout 2s: how many were served, how many
#             were closed without a response (FIN or RST), the longest any client waited
#             (bound: queue + connect timeout), the balancer's RSS before and at the queue's
#             peak per queued client (weighbridge's admin gauge weighbridge_pool_queue_length,
#             else a client-side estimate), and the latency of small requests through a second
#             listener to a server with room, before and during the overload.
#
# Knobs (environment): QUICK, SEEDS (a count: seeds 1..SEEDS), N (requests per run), RHOS,
# SYSTEMS, SCENARIOS, SLOTS, MEAN_MS, SIGMA, PREFILL, TOKENS_PER_S, QUEUE_TIMEOUT, HIDDEN,
# HIDDEN_RHO, REPLICAS_SYSTEM, REPLICAS_RHO, OVERLOAD_SYSTEMS, OVERLOAD_FACTOR,
# OVERLOAD_SECONDS, OVERLOAD_QUEUE_TIMEOUT, QUEUE_METRIC (weighbridge's queue gauge on its admin
# /metrics, weighbridge_pool_queue_length), LOAD_INTERVAL, LOAD_SATURATION (default: the largest
# server's slots), LOAD_METRIC (a gauge instead of the vllm preset's, e.g.
# vllm:num_requests_running), CLIENT_TIMEOUT
# (seconds a client waits for its whole answer, 120), SETTLE (seconds between a balancer's
# start and the first request, 2: time for the first load scrapes), WB (weighbridge binary;
# default target/release/weighbridge of this tree, built here), OUT_DIR, KEEP_TMP=1,
# SKIP_INSTALL=1, STRICT=1.
#
# It installs what is missing (Debian/apt, as root), builds weighbridge and the mock server in
# release mode, starts every server and balancer itself on free 127.0.0.1 ports (below the
# ephemeral range, so no outgoing connection takes one), starts a fresh balancer for every run
# (so no run inherits another's state), rotates the order of the systems from one seed to the
# next, prints the report and stops everything it started. Raw per-request results (JSON), a
# summary per run (summary.csv), the sequences and the generated configs are kept under
# OUT_DIR.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=(python3 "$HERE/bench.py")

# ------------------------------------------------------------------------------------ settings
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    SEEDS=${SEEDS:-1}
    N=${N:-100}
    OVERLOAD_SECONDS=${OVERLOAD_SECONDS:-10}
else
    SEEDS=${SEEDS:-3}
    N=${N:-500}
    OVERLOAD_SECONDS=${OVERLOAD_SECONDS:-60}
fi
RHOS=${RHOS:-"0.6 0.8 0.9"}
ALL_SYSTEMS="IDEAL WB_CP WB_SLOTS WB_SLOTS_LOAD HAPROXY_RR HAPROXY_LC HAPROXY_MAXCONN NGINX_LC"
SYSTEMS=${SYSTEMS:-$ALL_SYSTEMS}
SCENARIOS=${SCENARIOS:-"MAIN HIDDEN REPLICAS OVERLOAD"}
SLOTS=${SLOTS:-"3 4 2 5"}
MEAN_MS=${MEAN_MS:-400}
SIGMA=${SIGMA:-0.6}
PREFILL=${PREFILL:-0.1}
TOKENS_PER_S=${TOKENS_PER_S:-40}
QUEUE_TIMEOUT=${QUEUE_TIMEOUT:-60s}
HIDDEN=${HIDDEN:-3}
HIDDEN_RHO=${HIDDEN_RHO:-0.75}
REPLICAS_SYSTEM=${REPLICAS_SYSTEM:-WB_SLOTS_LOAD}
REPLICAS_RHO=${REPLICAS_RHO:-0.8}
OVERLOAD_SYSTEMS=${OVERLOAD_SYSTEMS:-"WB_SLOTS HAPROXY_MAXCONN"}
OVERLOAD_FACTOR=${OVERLOAD_FACTOR:-3}
OVERLOAD_QUEUE_TIMEOUT=${OVERLOAD_QUEUE_TIMEOUT:-10s}
CONNECT_TIMEOUT=2s   # weighbridge's default; HAProxy and nginx are given the same
LOAD_INTERVAL=${LOAD_INTERVAL:-1s}
QUEUE_METRIC=${QUEUE_METRIC:-weighbridge_pool_queue_length}
LOAD_METRIC=${LOAD_METRIC:-}
CLIENT_TIMEOUT=${CLIENT_TIMEOUT:-120}
SETTLE=${SETTLE:-2}
STRICT=${STRICT:-0}
WB=${WB:-}
NPROC=$(nproc)
MAXCONN=20000
NOFILE=65536
NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}
OUT_DIR=${OUT_DIR:-$ROOT/target/bench-inference/$(date +%Y%m%d-%H%M%S)}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

read -r -a SLOT_LIST <<<"$SLOTS"
read -r -a RHO_LIST <<<"$RHOS"
read -r -a SYS_LIST <<<"$SYSTEMS"
read -r -a SCEN_LIST <<<"$SCENARIOS"
read -r -a OVERLOAD_LIST <<<"$OVERLOAD_SYSTEMS"

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_num() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }
# seconds DURATION: "500ms", "10s" or "2m" in seconds (weighbridge, HAProxy and the report
# all read the same string).
seconds() {
    case $1 in
        *ms) is_uint "${1%ms}" && awk -v v="${1%ms}" 'BEGIN { printf "%g", v / 1000 }' ;;
        *s) is_uint "${1%s}" && echo "${1%s}" ;;
        *m) is_uint "${1%m}" && echo $(( ${1%m} * 60 )) ;;
        *) return 1 ;;
    esac
}
in_list() { local x=$1; shift; local y; for y in "$@"; do [[ $x == "$y" ]] && return 0; done; return 1; }

is_uint "$SEEDS" && (( SEEDS >= 1 && SEEDS <= 100 )) || die "SEEDS must be a count, 1..100"
is_uint "$N" && (( N >= 10 )) || die "N must be an integer >= 10"
(( ${#SLOT_LIST[@]} >= 1 )) || die "SLOTS is empty"
for s in "${SLOT_LIST[@]}"; do is_uint "$s" && (( s >= 1 )) || die "SLOTS: $s is not a count"; done
for r in "${RHO_LIST[@]}" "$HIDDEN_RHO" "$REPLICAS_RHO" "$OVERLOAD_FACTOR" "$MEAN_MS" "$SIGMA" \
    "$PREFILL" "$TOKENS_PER_S" "$CLIENT_TIMEOUT" "$SETTLE" "$OVERLOAD_SECONDS"; do
    is_num "$r" || die "not a number: $r"
done
for s in "${SYS_LIST[@]}" "${OVERLOAD_LIST[@]}" "$REPLICAS_SYSTEM"; do
    in_list "$s" $ALL_SYSTEMS || die "unknown system $s (known: $ALL_SYSTEMS)"
done
for s in "${SCEN_LIST[@]}"; do
    in_list "$s" MAIN HIDDEN REPLICAS OVERLOAD || die "unknown scenario $s"
done
[[ $REPLICAS_SYSTEM != IDEAL ]] || die "REPLICAS_SYSTEM must be a balancer"
for d in "$QUEUE_TIMEOUT" "$OVERLOAD_QUEUE_TIMEOUT" "$LOAD_INTERVAL"; do
    seconds "$d" >/dev/null || die "duration $d: write it as 500ms, 10s or 2m"
done
CAPACITY=0
BIG=0   # the server with the most slots: the one the hidden client sits on
for i in "${!SLOT_LIST[@]}"; do
    CAPACITY=$(( CAPACITY + SLOT_LIST[i] ))
    (( SLOT_LIST[i] > SLOT_LIST[BIG] )) && BIG=$i
done
is_uint "$HIDDEN" && (( HIDDEN <= SLOT_LIST[BIG] )) || die "HIDDEN must be 0..${SLOT_LIST[BIG]}"
# Queued requests at which a load-following weight reaches its floor: the largest server's
# slots, so a backlog of one full batch counts as saturated.
LOAD_SATURATION=${LOAD_SATURATION:-${SLOT_LIST[BIG]}}
is_num "$LOAD_SATURATION" || die "LOAD_SATURATION must be a number"
[[ -z $LOAD_METRIC || $LOAD_METRIC =~ ^[a-zA-Z_:][a-zA-Z0-9_:]*$ ]] || die "LOAD_METRIC: not a metric name"
[[ $QUEUE_METRIC =~ ^[a-zA-Z_:][a-zA-Z0-9_:]*$ ]] || die "QUEUE_METRIC: not a metric name"
QUEUE_TIMEOUT_S=$(seconds "$QUEUE_TIMEOUT")
OVERLOAD_QUEUE_TIMEOUT_S=$(seconds "$OVERLOAD_QUEUE_TIMEOUT")
CONNECT_TIMEOUT_S=$(seconds "$CONNECT_TIMEOUT")

# Every background service runs under `timeout`: even a killed script cannot leave one running
# for long. The budget: the expected length of the whole run, three times, plus half an hour.
expected=$(awk -v n="$N" -v seeds="$SEEDS" -v cap="$CAPACITY" -v mean="$MEAN_MS" \
    -v rhos="$RHOS" -v nsys="${#SYS_LIST[@]}" -v settle="$SETTLE" -v ovs="$OVERLOAD_SECONDS" \
    -v hrho="$HIDDEN_RHO" -v rrho="$REPLICAS_RHO" 'BEGIN {
        split(rhos, r, " "); t = 0
        for (i in r) t += seeds * nsys * (n / (r[i] * cap / mean * 1000) + settle + 10)
        t += seeds * nsys * (n / (hrho * cap / mean * 1000) + settle + 10)
        t += seeds * 2 * (n / (rrho * cap / mean * 1000) + settle + 10)
        t += 2 * (ovs + 60)
        printf "%d", t }')
SAFETY=$(( 3 * expected + 1800 ))

# ------------------------------------------------------------------------ processes and cleanup
PIDS=()            # one `timeout` wrapper per background service; each leads its process group
CREATED_POLICY=0   # whether we wrote /usr/sbin/policy-rc.d and must remove it
WORK=""
FAILURES=0
NOTES=()           # lines for the report: columns left out and why

group_alive() {    # does process group $1 still have a live (non-zombie) member?
    ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { f = 1 } END { exit !f }'
}
pid_alive() {      # is process $1 alive (not a zombie)?
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $st != Z* ]]
}

cleanup() {
    local rc=$? pid i any
    trap - EXIT INT TERM
    set +e
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
    local name=$1 pid=$2 i p missing listening
    shift 2
    for (( i = 0; i < 100; i++ )); do
        pid_alive "$pid" || { tail -n 20 "$WORK/$name.log" >&2; die "$name exited at start"; }
        missing=0
        listening=$(ss -Hltn | awk '{ n = split($4, a, ":"); print a[n] }')
        for p in "$@"; do
            grep -qx -- "$p" <<<"$listening" || missing=1
        done
        (( missing )) || return 0
        sleep 0.1
    done
    tail -n 20 "$WORK/$name.log" >&2
    die "$name is not listening on $* after 10 s"
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

# ------------------------------------------------------------------------------- dependencies
install_missing() {
    local pkgs=()
    if in_list HAPROXY_RR "${SYS_LIST[@]}" || in_list HAPROXY_LC "${SYS_LIST[@]}" ||
        in_list HAPROXY_MAXCONN "${SYS_LIST[@]}" "${OVERLOAD_LIST[@]}"; then
        command -v haproxy >/dev/null || pkgs+=(haproxy)
    fi
    if in_list NGINX_LC "${SYS_LIST[@]}"; then
        command -v nginx >/dev/null || pkgs+=(nginx)
        [[ -f $NGINX_STREAM_MODULE ]] || pkgs+=(libnginx-mod-stream)
    fi
    command -v ss >/dev/null || pkgs+=(iproute2)
    command -v ps >/dev/null || pkgs+=(procps)
    command -v python3 >/dev/null || pkgs+=(python3)
    (( ${#pkgs[@]} )) || return 0
    if [[ ${SKIP_INSTALL:-0} == 1 || $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        die "missing: ${pkgs[*]} (Debian: apt-get install ${pkgs[*]})"
    fi
    log "installing ${pkgs[*]}"
    # Debian's nginx/haproxy packages start their system services on install; a policy-rc.d
    # that says "no" prevents it (only if none exists).
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
    # The overload scenario keeps hundreds of clients waiting: each costs the client one
    # descriptor and the balancer one or two.
    local hard
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && (( hard < NOFILE )); then
        ulimit -Hn "$NOFILE" 2>/dev/null || true   # root may raise the hard limit
        hard=$(ulimit -Hn)
    fi
    if [[ $hard == unlimited ]] || (( hard >= NOFILE )); then ulimit -Sn "$NOFILE"; else ulimit -Sn "$hard"; fi
    NOFILE=$(ulimit -Sn)
    (( NOFILE >= 8192 )) || die "open-file limit $NOFILE < 8192: run as root or raise it"
    MAXCONN=$(( NOFILE / 3 < 20000 ? NOFILE / 3 : 20000 ))
}

install_missing
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (https://rustup.rs)"
WB_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
git -C "$ROOT" diff --quiet HEAD -- src examples Cargo.toml Cargo.lock 2>/dev/null || WB_REV+="+dirty"
log "building weighbridge and the mock inference server $WB_REV (release)"
( cd "$ROOT" && timeout 1800 cargo build --release --bin weighbridge --example mock_inference >&2 )
MOCK_SRC="$ROOT/target/release/examples/mock_inference"
[[ -x $MOCK_SRC ]] || die "$MOCK_SRC not built"
if [[ -z $WB ]]; then
    WB_SRC="$ROOT/target/release/weighbridge"
    WB_DESC="weighbridge $WB_REV"
else
    [[ -f $WB && -x $WB ]] || die "WB=$WB: not an executable file"
    WB_SRC=$(realpath "$WB")
    WB_DESC="weighbridge $($WB_SRC --version 2>/dev/null | awk '{print $2}') ($WB_SRC)"
fi
[[ -x $WB_SRC ]] || die "$WB_SRC not built"
raise_nofile

WORK=$(mktemp -d /tmp/weighbridge-inference.XXXXXX)
chmod 755 "$WORK"   # nginx workers run as an unprivileged user when started as root
mkdir -p "$WORK/bin" "$OUT_DIR/raw" "$OUT_DIR/seq" "$OUT_DIR/configs"
# Copies: a rebuild of either tree during the run changes nothing measured.
cp "$WB_SRC" "$WORK/bin/weighbridge"
cp "$MOCK_SRC" "$WORK/bin/mock_inference"
WB="$WORK/bin/weighbridge"
MOCK="$WORK/bin/mock_inference"
WB_DESC+=", sha256 $(sha256sum "$WB" | cut -c1-12)"

# --log-level error: errors only, like the others; --no-watch: HAProxy and nginx do not watch
# their files either. Each only if this build has the flag.
WB_HELP=$(timeout 10 "$WB" --help)
WB_FLAGS=()
if grep -q -- --log-level <<<"$WB_HELP"; then WB_FLAGS+=(--log-level error); fi
if grep -q -- --no-watch <<<"$WB_HELP"; then WB_FLAGS+=(--no-watch); fi

# ------------------------------------------------------------------------------------- ports
free_ports() { timeout 10 "${PY[@]}" ports "$1"; }
read -r -a FLEET_PORTS <<<"$(free_ports $(( ${#SLOT_LIST[@]} + 1 )))"
SIDE_PORT=${FLEET_PORTS[-1]}
unset 'FLEET_PORTS[-1]'

# ----------------------------------------------------------------------------- config writers
# Every balancer: the fleet's servers with weight = slots, connect timeout 2 s, idle timeout
# 10 min, connection limit MAXCONN, NPROC threads/workers, errors-only logging.

# wb_inline FILE PORT ADMIN_PORT [SIDE_LISTENER_PORT]: capacity_proportional, the inline
# [[listener.backend]] form; with a side port, a second listener to the side server.
wb_inline() {
    local f=$1 port=$2 admin=$3 side=${4:-} i
    {
        echo 'shutdown_grace = "1s"'
        echo "threads = $NPROC"
        echo
        echo "[admin]"
        echo "bind = \"127.0.0.1:$admin\""
        echo
        echo "[[listener]]"
        echo 'name = "bench"'
        echo "bind = \"127.0.0.1:$port\""
        echo 'strategy = "capacity_proportional"'
        echo "connect_timeout = \"$CONNECT_TIMEOUT\""
        echo 'idle_timeout = "10m"'
        echo "max_connections = $MAXCONN"
        for i in "${!SLOT_LIST[@]}"; do
            echo
            echo "[[listener.backend]]"
            echo "addr = \"127.0.0.1:${FLEET_PORTS[i]}\""
            echo "weight = ${SLOT_LIST[i]}"
        done
        if [[ -n $side ]]; then
            echo
            echo "[[listener]]"
            echo 'name = "side"'
            echo "bind = \"127.0.0.1:$side\""
            echo
            echo "[[listener.backend]]"
            echo "addr = \"127.0.0.1:$SIDE_PORT\""
        fi
    } >"$f"
}

# wb_pool FILE LOAD(0|1) PORT ADMIN_PORT QUEUE_TIMEOUT [SIDE_LISTENER_PORT]: the [[pool]]
# form: a slot-limited pool "gpu" with its queue (and, LOAD=1, load read from /metrics); with
# a side port, a second pool "side" of one unlimited server behind its own listener.
wb_pool() {
    local f=$1 load=$2 port=$3 admin=$4 qt=$5 side=${6:-} i
    {
        echo 'shutdown_grace = "1s"'
        echo "threads = $NPROC"
        echo
        echo "[admin]"
        echo "bind = \"127.0.0.1:$admin\""
        echo
        echo "[[pool]]"
        echo 'name = "gpu"'
        echo 'strategy = "capacity_proportional"'
        echo "queue_timeout = \"$qt\""
        echo "max_queued = 10000"
        if (( load )); then
            echo
            echo "[pool.health.load]"
            echo 'preset = "vllm"'
            if [[ -n $LOAD_METRIC ]]; then echo "metric = \"$LOAD_METRIC\""; fi
            echo "interval = \"$LOAD_INTERVAL\""
            echo "saturation = $LOAD_SATURATION"
        fi
        for i in "${!SLOT_LIST[@]}"; do
            echo
            echo "[[pool.backend]]"
            echo "addr = \"127.0.0.1:${FLEET_PORTS[i]}\""
            echo "weight = ${SLOT_LIST[i]}"
            echo "max_connections = ${SLOT_LIST[i]}"
        done
        if [[ -n $side ]]; then
            echo
            echo "[[pool]]"
            echo 'name = "side"'
            echo 'strategy = "capacity_proportional"'
            echo
            echo "[[pool.backend]]"
            echo "addr = \"127.0.0.1:$SIDE_PORT\""
        fi
        echo
        echo "[[listener]]"
        echo 'name = "bench"'
        echo "bind = \"127.0.0.1:$port\""
        echo 'pool = "gpu"'
        echo "connect_timeout = \"$CONNECT_TIMEOUT\""
        echo 'idle_timeout = "10m"'
        echo "max_connections = $MAXCONN"
        if [[ -n $side ]]; then
            echo
            echo "[[listener]]"
            echo 'name = "side"'
            echo "bind = \"127.0.0.1:$side\""
            echo 'pool = "side"'
        fi
    } >"$f"
}

# write_haproxy FILE MODE PORT QUEUE_TIMEOUT [SIDE_PORT]: MODE rr | lc | maxconn.
write_haproxy() {
    local f=$1 mode=$2 port=$3 qt=$4 side=${5:-} i limit
    {
        echo "global"
        echo "    nbthread $NPROC"
        echo "    maxconn $MAXCONN"
        echo "defaults"
        echo "    mode tcp"
        echo "    maxconn $MAXCONN"
        echo "    timeout connect $CONNECT_TIMEOUT"
        echo "    timeout client 10m"
        echo "    timeout server 10m"
        echo "    timeout queue $qt"
        echo "listen bench"
        echo "    bind 127.0.0.1:$port"
        if [[ $mode == rr ]]; then echo "    balance roundrobin"; else echo "    balance leastconn"; fi
        for i in "${!SLOT_LIST[@]}"; do
            limit=""
            [[ $mode == maxconn ]] && limit=" maxconn ${SLOT_LIST[i]}"
            echo "    server s$i 127.0.0.1:${FLEET_PORTS[i]} weight ${SLOT_LIST[i]}$limit"
        done
        if [[ -n $side ]]; then
            echo "listen side"
            echo "    bind 127.0.0.1:$side"
            echo "    server side 127.0.0.1:$SIDE_PORT"
        fi
    } >"$f"
}

write_nginx() {     # write_nginx DIR PORT [SIDE_PORT]
    local d=$1 port=$2 side=${3:-} i
    {
        if [[ -f $NGINX_STREAM_MODULE ]]; then echo "load_module $NGINX_STREAM_MODULE;"; fi
        echo "worker_processes $NPROC;"
        echo "worker_rlimit_nofile $NOFILE;"
        echo "pid $d/nginx.pid;"
        echo "error_log $d/error.log error;"
        echo "daemon off;"
        echo "events { worker_connections $(( 2 * MAXCONN < NOFILE ? 2 * MAXCONN : NOFILE )); }"
        echo "stream {"
        echo "    proxy_connect_timeout $CONNECT_TIMEOUT;"
        echo "    proxy_timeout 10m;"
        echo "    upstream gpu {"
        # Without a shared zone each worker would count only its own connections.
        echo "        zone gpu 64k;"
        echo "        least_conn;"
        for i in "${!SLOT_LIST[@]}"; do
            echo "        server 127.0.0.1:${FLEET_PORTS[i]} weight=${SLOT_LIST[i]};"
        done
        echo "    }"
        echo "    server { listen 127.0.0.1:$port; proxy_pass gpu; }"
        if [[ -n $side ]]; then
            echo "    server { listen 127.0.0.1:$side; proxy_pass 127.0.0.1:$SIDE_PORT; }"
        fi
        echo "}"
    } >"$d/nginx.conf"
}

# write_config SYS DIR PORT ADMIN_PORT QUEUE_TIMEOUT [SIDE_PORT]: the system's config in DIR;
# prints its path.
write_config() {
    local sys=$1 d=$2 port=$3 admin=$4 qt=$5 side=${6:-}
    mkdir -p "$d"
    case $sys in
        WB_CP) wb_inline "$d/weighbridge.toml" "$port" "$admin" "$side"; echo "$d/weighbridge.toml" ;;
        WB_SLOTS) wb_pool "$d/weighbridge.toml" 0 "$port" "$admin" "$qt" "$side"; echo "$d/weighbridge.toml" ;;
        WB_SLOTS_LOAD) wb_pool "$d/weighbridge.toml" 1 "$port" "$admin" "$qt" "$side"; echo "$d/weighbridge.toml" ;;
        HAPROXY_RR) write_haproxy "$d/haproxy.cfg" rr "$port" "$qt" "$side"; echo "$d/haproxy.cfg" ;;
        HAPROXY_LC) write_haproxy "$d/haproxy.cfg" lc "$port" "$qt" "$side"; echo "$d/haproxy.cfg" ;;
        HAPROXY_MAXCONN) write_haproxy "$d/haproxy.cfg" maxconn "$port" "$qt" "$side"; echo "$d/haproxy.cfg" ;;
        NGINX_LC) write_nginx "$d" "$port" "$side"; echo "$d/nginx.conf" ;;
        *) die "no config for $sys" ;;
    esac
}

# check_config SYS FILE: the system's own validation; its complaint goes to stderr.
check_config() {
    case $1 in
        WB_*) timeout 10 "$WB" --config "$2" --check >/dev/null ;;
        HAPROXY_*) timeout 10 haproxy -c -q -f "$2" ;;
        NGINX_LC) timeout 10 nginx -t -q -p "$(dirname "$2")" -c "$2" -e "$(dirname "$2")/error.log" ;;
    esac
}

# Which weighbridge columns this build can run: the [[pool]] form is newer than the inline one.
# The configs are generated (and kept under OUT_DIR/configs) either way; the overload form has
# a second pool and listener.
read -r -a probe_ports <<<"$(free_ports 3)"
declare -A UNSUPPORTED=()
for sys in WB_CP WB_SLOTS WB_SLOTS_LOAD; do
    forms=()
    in_list "$sys" "${SYS_LIST[@]}" "$REPLICAS_SYSTEM" && forms+=(main)
    in_list "$sys" "${OVERLOAD_LIST[@]}" && forms+=(overload)
    for form in "${forms[@]}"; do
        side=()
        [[ $form == overload ]] && side=("${probe_ports[2]}")
        f=$(write_config "$sys" "$WORK/probe-$sys-$form" "${probe_ports[0]}" "${probe_ports[1]}" \
            "$QUEUE_TIMEOUT" "${side[@]}")
        kept="configs/$sys.toml"
        [[ $form == main ]] || kept="configs/$sys-$form.toml"
        cp "$f" "$OUT_DIR/$kept"
        [[ -z ${UNSUPPORTED[$sys]:-} ]] || continue   # the first refusal is the one reported
        if ! err=$(check_config "$sys" "$f" 2>&1); then
            (( STRICT )) && die "$sys: $WB refuses its config $OUT_DIR/$kept: $err"
            # Its first line, without backquotes (the report quotes it in one).
            UNSUPPORTED[$sys]=$(head -n 1 <<<"$err" | tr '`' "'")
            log "$sys left out: this weighbridge refuses its config: ${UNSUPPORTED[$sys]}"
            NOTES+=("- $sys left out: $WB_DESC refuses its config ($kept): \`${UNSUPPORTED[$sys]}\`")
        fi
    done
done
drop_unsupported() {   # the names given, less the unsupported ones
    local s
    for s in "$@"; do [[ -n ${UNSUPPORTED[$s]:-} ]] || printf '%s\n' "$s"; done
}
mapfile -t SYS_LIST < <(drop_unsupported "${SYS_LIST[@]}")
mapfile -t OVERLOAD_LIST < <(drop_unsupported "${OVERLOAD_LIST[@]}")
REAL_SYSTEMS=()
for s in "${SYS_LIST[@]}"; do [[ $s == IDEAL ]] || REAL_SYSTEMS+=("$s"); done

# ---------------------------------------------------------------------------------- the fleet
declare -A MOCK_PID
start_mock() {   # start_mock INDEX HIDDEN
    local i=$1 hidden=$2
    start_bg "mock-$i" "$MOCK" --listen "127.0.0.1:${FLEET_PORTS[i]}" --slots "${SLOT_LIST[i]}" \
        --hidden "$hidden" --prefill "$PREFILL"
    MOCK_PID[$i]=$LAST_PID
}
for i in "${!SLOT_LIST[@]}"; do start_mock "$i" 0; done
start_bg mock-side "$MOCK" --listen "127.0.0.1:$SIDE_PORT" --prefill "$PREFILL"
SIDE_PID=$LAST_PID
for i in "${!SLOT_LIST[@]}"; do wait_listening "mock-$i" "${MOCK_PID[$i]}" "${FLEET_PORTS[i]}"; done
wait_listening mock-side "$SIDE_PID" "$SIDE_PORT"
log "fleet up: slots ${SLOT_LIST[*]} on ports ${FLEET_PORTS[*]} (side server :$SIDE_PORT)"

# ----------------------------------------------------------------------------------- balancers
# start_system INST SYS QUEUE_TIMEOUT [SIDE]: a fresh balancer on new ports; sets LAST_PID,
# PORT, ADMIN_PORT (weighbridge only, else empty) and SIDE_LISTEN (with SIDE=1).
start_system() {
    local inst=$1 sys=$2 qt=$3 want_side=${4:-0} d="$WORK/$1" f ports
    read -r -a ports <<<"$(free_ports 3)"
    PORT=${ports[0]}
    ADMIN_PORT=""
    SIDE_LISTEN=""
    (( want_side )) && SIDE_LISTEN=${ports[2]}
    f=$(write_config "$sys" "$d" "$PORT" "${ports[1]}" "$qt" ${SIDE_LISTEN:+"$SIDE_LISTEN"})
    check_config "$sys" "$f" || die "$sys refuses its config $f (above)"
    local listen=("$PORT")
    [[ -n $SIDE_LISTEN ]] && listen+=("$SIDE_LISTEN")
    case $sys in
        WB_*)
            ADMIN_PORT=${ports[1]}
            start_bg "$inst" "$WB" --config "$f" "${WB_FLAGS[@]}"
            listen+=("$ADMIN_PORT")
            ;;
        HAPROXY_*) start_bg "$inst" haproxy -db -f "$f" ;;
        NGINX_LC) start_bg "$inst" nginx -p "$d" -c "$f" -e "$d/error.log" ;;
    esac
    wait_listening "$inst" "$LAST_PID" "${listen[@]}"
}

# ----------------------------------------------------------------------------------- runs
failed() {   # failed WHAT LOGFILE: a failed measurement is reported, not fatal
    FAILURES=$(( FAILURES + 1 ))
    log "FAILED: $1 (see $2)"
    [[ -f $2 ]] && tail -n 5 "$2" >&2
    return 0
}

# sequence NAME SEED RHO N CAPACITY: generates (once) OUT_DIR/seq/NAME.json; sets SEQ, RATE, LAST_T.
sequence() {
    local out
    SEQ="$OUT_DIR/seq/$1.json"
    out=$(timeout 60 "${PY[@]}" gen --seed "$2" --rho "$3" --n "$4" --capacity "$5" \
        --mean-ms "$MEAN_MS" --sigma "$SIGMA" --tokens-per-s "$TOKENS_PER_S" --out "$SEQ")
    read -r RATE LAST_T <<<"$out"
}

# keep_config SCENARIO SYS INST: the first config of each column, for the record.
keep_config() {
    local f
    for f in "$WORK/$3"/*.toml "$WORK/$3"/*.cfg "$WORK/$3"/*.conf; do
        [[ -f $f ]] || continue
        [[ -f $OUT_DIR/configs/$1-$2.${f##*.} ]] || cp "$f" "$OUT_DIR/configs/$1-$2.${f##*.}"
    done
}

# measure SCEN SYS RHO SEED HIDDEN_SLOTS [REPLICAS]: one run of the current sequence ($SEQ).
measure() {
    local scen=$1 sys=$2 rho=$3 seed=$4 hidden=$5 replicas=${6:-1} name out budget pids=() ports=()
    local k
    name="$scen-rho$rho-seed$seed-$sys"
    (( replicas > 1 )) && name+="-x$replicas"
    out="$OUT_DIR/raw/$name.json"
    local meta=(--meta "scenario=$scen" --meta "system=$sys" --meta "rho=$rho" --meta "seed=$seed"
        --meta "n=$N" --meta "rate=$RATE" --meta "replicas=$replicas" --meta "seq=$SEQ")
    if [[ $sys == IDEAL ]]; then
        timeout 60 "${PY[@]}" ideal --seq "$SEQ" --slots "$(IFS=,; echo "${SLOT_LIST[*]}")" \
            --hidden "$hidden" --prefill "$PREFILL" --out "$out" "${meta[@]}" \
            --meta "note=IDEAL has $(( CAPACITY - hidden )) slots" ||
            failed "$name" "$out"
        return 0
    fi
    for (( k = 1; k <= replicas; k++ )); do
        start_system "$name-$k" "$sys" "$QUEUE_TIMEOUT"
        pids+=("$LAST_PID")
        ports+=("$PORT")
        keep_config "$scen" "$sys" "$name-$k"
    done
    sleep "$SETTLE"
    budget=$(awk -v t="$LAST_T" -v c="$CLIENT_TIMEOUT" 'BEGIN { printf "%d", t + c + 60 }')
    if timeout -k 5 "$budget" "${PY[@]}" run --seq "$SEQ" --ports "$(IFS=,; echo "${ports[*]}")" \
        --out "$out" --timeout "$CLIENT_TIMEOUT" "${meta[@]}" >"$WORK/$name.out" 2>&1; then
        log "$name: $(tail -n 1 "$WORK/$name.out")"
    else
        failed "$name" "$WORK/$name.out"
    fi
    for k in "${pids[@]}"; do stop_group "$k"; done
}

# rotated INDEX NAME...: the names, starting from INDEX (mod their number).
rotated() {
    local k=$1
    shift
    local a=("$@")
    (( ${#a[@]} )) || return 0
    k=$(( k % ${#a[@]} ))
    printf '%s\n' "${a[@]:k}" "${a[@]:0:k}"
}

# CPU time the hypervisor gave to others (steal) and the machine's total, from /proc/stat: on a
# shared virtual machine, what other tenants took from this run.
cpu_counters() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t; exit }' /proc/stat; }
read -r STEAL0 TOTAL0 <<<"$(cpu_counters)"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s)

if in_list MAIN "${SCEN_LIST[@]}"; then
    for (( seed = 1; seed <= SEEDS; seed++ )); do
        for ri in "${!RHO_LIST[@]}"; do
            rho=${RHO_LIST[ri]}
            sequence "main-rho$rho-seed$seed" "$seed" "$rho" "$N" "$CAPACITY"
            mapfile -t order < <(rotated $(( seed - 1 + ri )) "${SYS_LIST[@]}")
            log "MAIN ρ=$rho seed $seed ($RATE req/s, ${LAST_T}s): ${order[*]}"
            for sys in "${order[@]}"; do measure MAIN "$sys" "$rho" "$seed" 0; done
        done
    done
fi

if in_list REPLICAS "${SCEN_LIST[@]}"; then
    if [[ -n ${UNSUPPORTED[$REPLICAS_SYSTEM]:-} ]]; then
        NOTES+=("- REPLICAS not run: it needs $REPLICAS_SYSTEM (REPLICAS_SYSTEM)")
    else
        for (( seed = 1; seed <= SEEDS; seed++ )); do
            sequence "replicas-rho$REPLICAS_RHO-seed$seed" "$seed" "$REPLICAS_RHO" "$N" "$CAPACITY"
            log "REPLICAS ρ=$REPLICAS_RHO seed $seed: $REPLICAS_SYSTEM ×1 and ×2"
            # Which goes first alternates by seed.
            if (( seed % 2 )); then counts=(1 2); else counts=(2 1); fi
            for c in "${counts[@]}"; do
                measure REPLICAS "$REPLICAS_SYSTEM" "$REPLICAS_RHO" "$seed" 0 "$c"
            done
        done
    fi
fi

if in_list OVERLOAD "${SCEN_LIST[@]}"; then
    rate=$(awk -v f="$OVERLOAD_FACTOR" -v c="$CAPACITY" -v m="$MEAN_MS" 'BEGIN { printf "%.6f", f * c / (m / 1000) }')
    n_over=$(awk -v r="$rate" -v s="$OVERLOAD_SECONDS" 'BEGIN { printf "%d", r * s + 0.5 }')
    sequence "overload-x$OVERLOAD_FACTOR" 1 "$OVERLOAD_FACTOR" "$n_over" "$CAPACITY"
    (( ${#OVERLOAD_LIST[@]} )) || NOTES+=("- OVERLOAD not run: none of its systems can run here")
    for sys in "${OVERLOAD_LIST[@]}"; do
        [[ $sys == IDEAL ]] && continue
        name="OVERLOAD-$sys"
        log "OVERLOAD $sys: $n_over requests at $RATE req/s for ${OVERLOAD_SECONDS}s"
        start_system "$name" "$sys" "$OVERLOAD_QUEUE_TIMEOUT" 1
        pid=$LAST_PID
        keep_config OVERLOAD "$sys" "$name"
        sleep "$SETTLE"
        extra=()
        [[ -n $ADMIN_PORT ]] && extra+=(--admin-port "$ADMIN_PORT" --queue-metric "$QUEUE_METRIC")
        extra+=(--side-port "$SIDE_LISTEN")
        # Only these queue clients in the balancer, for at most the queue timeout.
        queue_meta=()
        case $sys in
            WB_SLOTS | WB_SLOTS_LOAD | HAPROXY_MAXCONN)
                queue_meta=(--meta "queue_timeout_s=$OVERLOAD_QUEUE_TIMEOUT_S") ;;
        esac
        budget=$(awk -v t="$LAST_T" -v c="$CLIENT_TIMEOUT" 'BEGIN { printf "%d", t + c + 60 }')
        if timeout -k 5 "$budget" "${PY[@]}" run --seq "$SEQ" --ports "$PORT" \
            --out "$OUT_DIR/raw/$name.json" --timeout "$CLIENT_TIMEOUT" --lead 3 --tail 1 \
            --sample-root "$pid" "${extra[@]}" \
            --meta scenario=OVERLOAD --meta "system=$sys" --meta "rho=$OVERLOAD_FACTOR" \
            --meta seed=1 --meta "n=$n_over" --meta "rate=$RATE" --meta "seq=$SEQ" \
            --meta "factor=$OVERLOAD_FACTOR" --meta "seconds=$OVERLOAD_SECONDS" \
            "${queue_meta[@]}" \
            --meta "connect_timeout_s=$CONNECT_TIMEOUT_S" --meta "prefill=$PREFILL" \
            --meta "slots_total=$CAPACITY" >"$WORK/$name.out" 2>&1; then
            log "$name: $(tail -n 1 "$WORK/$name.out")"
        else
            failed "$name" "$WORK/$name.out"
        fi
        stop_group "$pid"
    done
fi

if in_list HIDDEN "${SCEN_LIST[@]}"; then
    # The largest server again, now with a hidden client on HIDDEN of its slots.
    stop_group "${MOCK_PID[$BIG]}"
    start_mock "$BIG" "$HIDDEN"
    wait_listening "mock-$BIG" "${MOCK_PID[$BIG]}" "${FLEET_PORTS[BIG]}"
    log "HIDDEN: server $BIG (${SLOT_LIST[BIG]} slots, :${FLEET_PORTS[BIG]}) has $HIDDEN held by a hidden client"
    for (( seed = 1; seed <= SEEDS; seed++ )); do
        sequence "hidden-rho$HIDDEN_RHO-seed$seed" "$seed" "$HIDDEN_RHO" "$N" "$CAPACITY"
        mapfile -t order < <(rotated $(( seed - 1 )) "${SYS_LIST[@]}")
        log "HIDDEN ρ=$HIDDEN_RHO seed $seed ($RATE req/s): ${order[*]}"
        for sys in "${order[@]}"; do measure HIDDEN "$sys" "$HIDDEN_RHO" "$seed" "$HIDDEN"; done
    done
fi
ELAPSED=$(( $(date +%s) - START ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
read -r STEAL1 TOTAL1 <<<"$(cpu_counters)"
STEAL=$(awk -v s=$(( STEAL1 - STEAL0 )) -v t=$(( TOTAL1 - TOTAL0 )) 'BEGIN { printf "%.1f%%", (t > 0 ? 100 * s / t : 0) }')

# -------------------------------------------------------------------------------------- report
REPORT="$OUT_DIR/report.md"
{
    echo "### Inference fleet: weighbridge vs HAProxy vs nginx, time to first token on 127.0.0.1"
    echo
    echo "- machine: $NPROC cores, $(awk -F': *' '/model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
    versions=("$WB_DESC")
    # awk reads all of the output (head would leave the writer a SIGPIPE, fatal with pipefail).
    if command -v haproxy >/dev/null; then versions+=("$(haproxy -v | awk 'NR == 1 { print "HAProxy " $3 }')"); fi
    if command -v nginx >/dev/null; then versions+=("$(nginx -v 2>&1 | sed 's|.*nginx/|nginx |')"); fi
    echo "- $(IFS=';'; echo "${versions[*]}" | sed 's/;/, /g')"
    echo "- fleet: ${#SLOT_LIST[@]} mock servers with ${SLOT_LIST[*]} slots ($CAPACITY); service times log-normal, mean ${MEAN_MS} ms, σ $SIGMA, given per request; first token after ${PREFILL} of the service time; ${TOKENS_PER_S} tokens/s; one connection per request"
    echo "- SEEDS=$SEEDS, N=$N requests per run, queue timeout $QUEUE_TIMEOUT (WB_SLOTS*, HAPROXY_MAXCONN), load scrape every $LOAD_INTERVAL (saturation $LOAD_SATURATION), client timeout ${CLIENT_TIMEOUT}s; took ${ELAPSED}s; load average before: $LOAD_START, after: $LOAD_END; CPU steal $STEAL"
    echo "- TTFT: from just before the connect to the first byte of the answer; total: to its last byte. Percentiles over the completed requests of a run (nearest rank); errors counted apart"
    if (( ${#NOTES[@]} )); then echo; printf '%s\n' "${NOTES[@]}"; fi
    timeout 120 "${PY[@]}" report "$OUT_DIR" --systems "$(IFS=,; echo "${SYS_LIST[*]}")"
    (( FAILURES == 0 )) || { echo; echo "**$FAILURES run(s) failed; see the log above.**"; }
} >"$REPORT"
cat "$REPORT"
log "report: $REPORT (raw: $OUT_DIR/raw, per run: $OUT_DIR/summary.csv)"
(( FAILURES == 0 )) || exit 1
