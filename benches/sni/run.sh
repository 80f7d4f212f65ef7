#!/usr/bin/env bash
# Routing by server name, with real TLS clients and servers on 127.0.0.1: checks, then a
# benchmark against HAProxy.
#
#   bash benches/sni/run.sh              # checks, then REPS=5 rounds of DURATION=5 s per system
#   CHECK_ONLY=1 bash benches/sni/run.sh # the checks alone (a few seconds once built)
#
# Backends are nginx HTTPS servers with one self-signed certificate (made here with openssl)
# for `localhost`, `llama.example.com`, `embed.example.com` and 127.0.0.1; each answers with
# its pool's name. The balancer never holds the key.
#
# Checks (exit 1 on the first that fails), through weighbridge's SNI listener:
#   - `openssl s_client -servername NAME` completes the handshake, verifying the certificate
#     against the CA file, and the HTTP answer names the route's pool;
#   - `curl --resolve NAME:PORT:127.0.0.1 --cacert ...` likewise for each name;
#   - `curl -k https://127.0.0.1:PORT/` (no server name: curl sends none for an address) gets
#     the default route; a plain-HTTP client, too.
#
# Benchmark: new TLS connections per second (`wrk`, `Connection: close`, so every request is a
# full handshake) through
#   WB_SNI      weighbridge, a listener with SNI routes (the name picks the pool)
#   WB_PLAIN    weighbridge, a plain listener to the same pool (no ClientHello read)
#   HAPROXY_SNI HAProxy, mode tcp, `tcp-request inspect-delay` + `req.ssl_sni` routing
# in rotating order each round; prints per-system medians and the paired per-round ratios
# WB_SNI / HAPROXY_SNI and WB_SNI / WB_PLAIN. Knobs: REPS, DURATION, CONNS, KEEP_TMP=1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
REPS=${REPS:-5}
DURATION=${DURATION:-5}
CONNS=${CONNS:-32}
CHECK_ONLY=${CHECK_ONLY:-0}

log() { printf 'sni: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------------------- installation
bash "$ROOT/scripts/install-test-peers.sh" >/dev/null
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v wrk >/dev/null || need+=(wrk)
if (( ${#need[@]} )); then
    [[ $(id -u) == 0 ]] || die "missing ${need[*]}; install them (as root: apt-get install ${need[*]})"
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
(cd "$ROOT" && cargo build --release --quiet)
WB="$ROOT/target/release/weighbridge"

WORK=$(mktemp -d /tmp/weighbridge-sni.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [[ -f $WORK/nginx.pid ]] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    if [[ ${KEEP_TMP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    local port=$1 i
    for i in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.05
    done
    die "nothing listens on $port"
}

# ----------------------------------------------------------------------------- certificates
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,DNS:llama.example.com,DNS:embed.example.com,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

# ---------------------------------------------------------------------------------- backends
LLAMA=$(free_port); EMBED=$(free_port)
cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  ssl_certificate $WORK/cert.pem;
  ssl_certificate_key $WORK/key.pem;
  server { listen 127.0.0.1:$LLAMA ssl; location / { return 200 "llama\n"; } }
  server { listen 127.0.0.1:$EMBED ssl; location / { return 200 "embed\n"; } }
}
EOF
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK" -e "$WORK/nginx.err"
wait_port "$LLAMA"; wait_port "$EMBED"

# --------------------------------------------------------------------------------- balancers
WB_SNI=$(free_port); WB_PLAIN=$(free_port); HAPROXY_SNI=$(free_port)
cat >"$WORK/weighbridge.toml" <<EOF
shutdown_grace = "1s"
[log]
format = "text"

[[listener]]
name = "sni"
bind = "127.0.0.1:$WB_SNI"
[[listener.route]]
sni = ["localhost", "llama.example.com"]
pool = "llama"
[[listener.route]]
sni = ["embed.example.com"]
pool = "embed"
[[listener.route]]
pool = "llama"

[[listener]]
name = "plain"
bind = "127.0.0.1:$WB_PLAIN"
pool = "llama"

[[pool]]
name = "llama"
[[pool.backend]]
addr = "127.0.0.1:$LLAMA"

[[pool]]
name = "embed"
[[pool.backend]]
addr = "127.0.0.1:$EMBED"
EOF
"$WB" --config "$WORK/weighbridge.toml" --no-watch --log-level warn 2>"$WORK/weighbridge.log" &
PIDS+=($!)
cat >"$WORK/haproxy.cfg" <<EOF
global
  maxconn 4000
defaults
  mode tcp
  timeout connect 2s
  timeout client 60s
  timeout server 60s
frontend sni
  bind 127.0.0.1:$HAPROXY_SNI
  tcp-request inspect-delay 5s
  tcp-request content accept if { req_ssl_hello_type 1 }
  use_backend embed if { req.ssl_sni -i embed.example.com }
  default_backend llama
backend llama
  server l 127.0.0.1:$LLAMA
backend embed
  server e 127.0.0.1:$EMBED
EOF
"$HAPROXY" -f "$WORK/haproxy.cfg" -db 2>"$WORK/haproxy.log" &
PIDS+=($!)
wait_port "$WB_SNI"; wait_port "$WB_PLAIN"; wait_port "$HAPROXY_SNI"

# ------------------------------------------------------------------------------------ checks
expect() {   # expect WHAT WANT GOT
    [[ $3 == "$2" ]] || die "$1: expected '$2', got '$3'"
    log "ok: $1 -> $3"
}
for name in llama.example.com embed.example.com localhost; do
    want=${name%%.*}; [[ $name == localhost ]] && want=llama
    got=$(printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' "$name" |
        timeout 10 openssl s_client -connect "127.0.0.1:$WB_SNI" -servername "$name" \
            -CAfile "$WORK/cert.pem" -verify_return_error -quiet 2>/dev/null | tail -n 1)
    expect "openssl s_client -servername $name" "$want" "$got"
    got=$(curl -sS --max-time 10 --cacert "$WORK/cert.pem" \
        --resolve "$name:$WB_SNI:127.0.0.1" "https://$name:$WB_SNI/")
    expect "curl --resolve $name" "$want" "$got"
done
got=$(curl -sSk --max-time 10 "https://127.0.0.1:$WB_SNI/")
expect "curl, no server name (default route)" llama "$got"
got=$(curl -s --max-time 10 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$WB_SNI/" || true)
expect "plain HTTP to a TLS backend (default route; nginx answers 400)" 400 "$got"
if [[ $CHECK_ONLY == 1 ]]; then
    log "checks passed"
    exit 0
fi

# --------------------------------------------------------------------------------- benchmark
SYSTEMS=(WB_SNI WB_PLAIN HAPROXY_SNI)
declare -A PORT=([WB_SNI]=$WB_SNI [WB_PLAIN]=$WB_PLAIN [HAPROXY_SNI]=$HAPROXY_SNI)
: >"$WORK/results"
for rep in $(seq 1 "$REPS"); do
    order=("${SYSTEMS[@]:rep%3}" "${SYSTEMS[@]:0:rep%3}")
    for sys in "${order[@]}"; do
        rps=$(wrk -t 2 -c "$CONNS" -d "${DURATION}s" -H 'Connection: close' \
            "https://localhost:${PORT[$sys]}/" | awk '/Requests\/sec/ {print $2}')
        echo "$rep $sys $rps" >>"$WORK/results"
        log "round $rep $sys: $rps TLS connections/s"
    done
done
python3 - "$WORK/results" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
by = {}
for rep, sys_, rps in rows:
    by.setdefault(rep, {})[sys_] = float(rps)
systems = ["WB_SNI", "WB_PLAIN", "HAPROXY_SNI"]
print("| system | new TLS connections/s (median) |")
print("|---|---:|")
for s in systems:
    print(f"| {s} | {statistics.median(r[s] for r in by.values()):.0f} |")
for num, den in [("WB_SNI", "HAPROXY_SNI"), ("WB_SNI", "WB_PLAIN")]:
    ratios = [r[num] / r[den] for r in by.values()]
    shown = ", ".join(f"{x:.3f}" for x in ratios)
    print(f"\n{num} / {den}: median {statistics.median(ratios):.3f} (rounds: {shown})")
EOF
