#!/usr/bin/env python3
"""Helpers for benches/compare/run.sh. Standard library only (Python >= 3.8).

Subcommands:
  ports N                      print N free TCP ports on 127.0.0.1 (asked of the kernel)
  echo PORT[,PORT...]          echo server on each port (epoll, one thread), until SIGTERM
  pingpong --labels --ports    round-trip latency of small messages, systems interleaved:
                               prints "LABEL p50_us p99_us" per system
  idle --port P --root PID     opens N idle proxied connections, prints RSS KiB per connection
  cpu --root PID               prints utime+stime seconds of PID's descendants
  busy --root PID              prints machine busy CPU seconds and those of PID's process tree
  parse-iperf FILE             prints "bits_per_second bytes" from iperf3 -J output
  parse-wrk FILE               prints "req_per_s p50_us p99_us errors" from wrk --latency output
  report RESULTS --systems ... prints the markdown table (and target checks; with --pair BASE,
                               the subject's per-round ratios against BASE)

Measuring helpers print one line on stdout and exit non-zero on any failure, so the shell
script can tell a measurement from an error.
"""

import argparse
import gc
import json
import math
import os
import re
import selectors
import signal
import socket
import statistics
import sys
import time


# ----------------------------------------------------------------------------- ports

def cmd_ports(args):
    # Bind them all at once so the kernel hands out N distinct ports, then release them.
    # Another process could grab one before we use it; run.sh checks every bind.
    socks = []
    for _ in range(args.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


# ----------------------------------------------------------------------------- echo server

def cmd_echo(args):
    """Echo backend for ping-pong and idle connections.

    A single-threaded epoll loop: cheap per connection (thousands of idle ones cost the backend
    nothing that matters) and with a fixed, small per-message cost that is the same for every
    column, so differences between columns are the balancers'.
    """
    sel = selectors.DefaultSelector()
    for port in (int(p) for p in args.ports.split(",")):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(4096)
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ, None)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    pending = {}  # socket -> bytes not yet sent back (only under back-pressure)
    gc.disable()
    while not stop:
        for key, mask in sel.select(timeout=0.5):
            s = key.fileobj
            if key.data is None:  # listening socket
                for _ in range(256):
                    try:
                        c, _ = s.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(c, selectors.EVENT_READ, "c")
                continue
            try:
                if mask & selectors.EVENT_WRITE:
                    buf = pending[s]
                    n = s.send(buf)
                    if n < len(buf):
                        pending[s] = buf[n:]
                    else:
                        del pending[s]
                        sel.modify(s, selectors.EVENT_READ, "c")
                    continue
                data = s.recv(65536)
                if not data:
                    raise ConnectionResetError
                n = s.send(data)
                if n < len(data):
                    pending[s] = data[n:]
                    sel.modify(s, selectors.EVENT_WRITE, "c")
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pending.pop(s, None)
                sel.unregister(s)
                s.close()


# ----------------------------------------------------------------------------- ping-pong

def recv_exact(s, view, n):
    got = 0
    while got < n:
        k = s.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k


def percentile(sorted_values, q):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        raise ValueError("no samples")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def cmd_pingpong(args):
    """One message in flight at a time: send SIZE bytes, wait for the SIZE-byte echo.

    All systems are measured in one process, interleaved in short blocks (rotating which goes
    first), so a change of machine state during the run (another job starting, the scheduler
    moving processes between cores) hits every system alike instead of whichever ran then.
    Each system gets CONNS connections, so round robin visits every backend.
    Prints one line per system: "LABEL p50_us p99_us".
    """
    labels = args.labels.split(",")
    ports = [int(p) for p in args.ports.split(",")]
    if len(labels) != len(ports):
        raise SystemExit("pingpong: --labels and --ports differ in length")
    msg = os.urandom(args.size)
    buf = bytearray(args.size)
    view = memoryview(buf)
    conns = {}
    for label, port in zip(labels, ports):
        conns[label] = []
        for _ in range(args.conns):
            s = socket.create_connection(("127.0.0.1", port), timeout=args.timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns[label].append(s)

    def exchange(s, n, out):
        for _ in range(n):
            t0 = clock()
            s.sendall(msg)
            recv_exact(s, view, args.size)
            t1 = clock()
            if out is not None:
                out.append(t1 - t0)

    clock = time.perf_counter_ns
    gc.disable()  # a collection in the middle of a sample would show up as a p99 outlier
    for label in labels:  # warm every path up (connect done, caches and branch predictors warm)
        for s in conns[label]:
            exchange(s, args.warmup, None)
    samples = {label: [] for label in labels}
    per_block = max(1, args.count // (args.blocks * args.conns))
    for b in range(args.blocks):
        k = b % len(labels)
        for label in labels[k:] + labels[:k]:
            for s in conns[label]:
                exchange(s, per_block, samples[label])
    for label in labels:
        for s in conns[label]:
            s.close()
        if bytes(buf) != msg:
            raise SystemExit("ping-pong: echo does not match what was sent")
        xs = sorted(samples[label])
        print(f"{label} {percentile(xs, 50) / 1000:.2f} {percentile(xs, 99) / 1000:.2f}")


# ----------------------------------------------------------------------------- /proc

# Flag of a kernel thread in /proc/PID/stat.
PF_KTHREAD = 0x00200000


def descendants(root, allow_none=False):
    """PIDs of all descendants of ROOT (not ROOT itself: that is run.sh's `timeout` wrapper)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    if not out and not allow_none:
        raise SystemExit(f"no process under pid {root}")
    return out


def rss_kib(pids):
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        with open(f"/proc/{p}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: all threads of the process
    return total / tick


def cmd_other_cpu(args):
    """CPU seconds other processes have spent so far: the noise a shared machine adds.

    Sums utime + stime + cutime + cstime over every user-space process that is neither ROOT nor
    one of its descendants. Children's times are in their parent's c*time once reaped, so work
    that starts and ends between two readings is still counted (in its parent, or init). Kernel
    threads are left out: ksoftirqd and kworkers run the benchmark's own loopback traffic.

    (Machine busy time from /proc/stat minus our processes' time does not work: a process's
    system time includes the softirq work done in its context, which /proc/stat files under
    softirq, so on loopback "ours" exceeds "busy" and hides other work.)
    """
    tick = os.sysconf("SC_CLK_TCK")
    ours = {args.root, *descendants(args.root, allow_none=True)}
    other = 0
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in ours:
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[6]) & PF_KTHREAD:
            continue
        other += sum(int(x) for x in fields[11:15])
    print(f"{other / tick:.2f}")


def cmd_cpu(args):
    print(f"{cpu_seconds(descendants(args.root)):.3f}")


# ----------------------------------------------------------------------------- idle memory

def cmd_idle(args):
    """RSS cost of idle proxied connections.

    Each connection sends one byte and waits for its echo, so it is proven to be relayed end to
    end (both legs open) before it is counted; then all sit idle while the balancer's RSS is
    read again. RSS is summed over every process of the balancer (nginx master + workers).
    """
    pids = descendants(args.root)
    before = rss_kib(pids)
    socks = []
    deadline = time.monotonic() + args.timeout
    try:
        for _ in range(args.conns):
            if time.monotonic() > deadline:
                raise SystemExit(f"idle: only {len(socks)} of {args.conns} connections in time")
            s = socket.create_connection(("127.0.0.1", args.port), timeout=10)
            socks.append(s)
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise SystemExit(f"idle: connection {len(socks)} was not relayed")
        time.sleep(args.settle)  # let lazily allocated state appear before reading RSS
        after = rss_kib(descendants(args.root))
    finally:
        for s in socks:
            s.close()
    print(f"{(after - before) / args.conns:.3f}")


# ----------------------------------------------------------------------------- parsers

def cmd_parse_iperf(args):
    with open(args.file) as f:
        data = json.load(f)
    if "error" in data:
        raise SystemExit(f"iperf3: {data['error']}")
    r = data["end"]["sum_received"]
    print(f"{r['bits_per_second']:.0f} {r['bytes']}")


UNITS_US = {"us": 1.0, "ms": 1000.0, "s": 1e6, "m": 60e6}


def cmd_parse_wrk(args):
    with open(args.file) as f:
        text = f.read()
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise SystemExit("wrk: no Requests/sec line")
    rps = float(m.group(1))
    lat = {}
    for q, v, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        lat[q] = float(v) * UNITS_US[unit]
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors += int(m.group(1))
    print(f"{rps:.1f} {lat.get('50', float('nan')):.1f} {lat.get('99', float('nan')):.1f} {errors}")


# ----------------------------------------------------------------------------- report

# key, label, unit, higher_is_better, decimals
METRICS = [
    ("bulk1_gbps", "bulk throughput, 1 stream", "Gbit/s", True, 2),
    ("bulk8_gbps", "bulk throughput, 8 streams", "Gbit/s", True, 2),
    ("cps", "new connections/s (HTTP/1.1, Connection: close)", "conn/s", True, 0),
    ("ka_rps", "keep-alive requests/s (wrk -c64)", "req/s", True, 0),
    ("ka_p50_us", "keep-alive latency p50", "µs", False, 0),
    ("ka_p99_us", "keep-alive latency p99", "µs", False, 0),
    ("pp_p50_us", "ping-pong 64 B round trip p50", "µs", False, 1),
    ("pp_p99_us", "ping-pong 64 B round trip p99", "µs", False, 1),
    ("pp_add_p50_us", "ping-pong added vs DIRECT, p50", "µs", False, 1),
    ("pp_add_p99_us", "ping-pong added vs DIRECT, p99", "µs", False, 1),
    ("idle_kib", "RSS per idle proxied connection", "KiB", False, 2),
    ("cpu_s_per_gb", "CPU per GB moved (bulk runs, user+sys)", "s/GB", False, 3),
    ("machine_s_per_gb", "machine CPU per GB (bulk runs: sender, receiver, balancer)", "s/GB",
     False, 3),
    ("cps_cpu_us", "CPU per new connection (user+sys)", "µs", False, 1),
    ("ka_cpu_us", "CPU per keep-alive request (user+sys)", "µs", False, 2),
]
THROUGHPUT = ["bulk1_gbps", "bulk8_gbps", "cps", "ka_rps"]


def load_results(path):
    """{metric: {system: {rep: value}}}, with the added-latency metrics derived per rep."""
    res = {}
    with open(path) as f:
        for line in f:
            rep, system, metric, value = line.rstrip("\n").split("\t")
            try:
                v = float(value)
            except ValueError:
                continue
            if v != v:  # NaN: a value the tool did not report
                continue
            res.setdefault(metric, {}).setdefault(system, {})[int(rep)] = v
    for q in ("50", "99"):
        src, dst = res.get(f"pp_p{q}_us", {}), {}
        direct = src.get("DIRECT", {})
        for system, reps in src.items():
            if system == "DIRECT":
                continue
            dst[system] = {r: v - direct[r] for r, v in reps.items() if r in direct}
        res[f"pp_add_p{q}_us"] = dst
    return res


def paired_ratio(res, metric, num, dens, pick):
    """Median over reps of num / pick(den values of that rep); None when no rep has all."""
    by = res.get(metric, {})
    ratios = []
    for rep, v in by.get(num, {}).items():
        ds = [by.get(d, {}).get(rep) for d in dens]
        if any(d is None for d in ds):
            continue
        d = pick(ds)
        if d > 0:
            ratios.append(v / d)
    return statistics.median(ratios) if ratios else None


def fmt(v, decimals):
    if v is None:
        return "—"
    if decimals == 0:
        return f"{v:,.0f}"
    return f"{v:,.{decimals}f}"


def pair_report(res, systems, subject, base):
    """Before/after: every metric's per-round paired ratio SUBJECT/BASE.

    The two builds ran side by side in every round, so machine drift between rounds cancels in
    each round's ratio; how far the rounds' ratios scatter around 1.0 is the noise, and a change
    shows as ratios that stay on one side of it round after round.
    """
    if subject not in systems or base not in systems:
        return
    print(f"\nBefore/after: {subject} / {base}, per round (paired; for a 'higher' metric above "
          f"1.00x is better, for a 'lower' one below):\n")
    print("| metric | better | median | change | per round | rounds better : worse |")
    print("|---|---|---:|---:|---|---:|")
    for key, label, _unit, higher, _dec in METRICS:
        by = res.get(key, {})
        s, b = by.get(subject, {}), by.get(base, {})
        ratios = [(r, s[r] / b[r]) for r in sorted(s) if r in b and b[r] > 0]
        if not ratios:
            continue
        med = statistics.median(v for _, v in ratios)
        better = sum(1 for _, v in ratios if (v > 1.0 if higher else v < 1.0))
        worse = sum(1 for _, v in ratios if (v < 1.0 if higher else v > 1.0))
        rounds = " ".join(f"{v:.3f}" for _, v in ratios)
        print(f"| {label} | {'higher' if higher else 'lower'} | {med:.3f}x | "
              f"{(med - 1) * 100:+.1f}% | {rounds} | {better} : {worse} |")


def cmd_report(args):
    res = load_results(args.results)
    systems = args.systems.split(",")
    subject = args.subject
    baselines = [b for b in args.baselines.split(",") if b]
    head = ["metric", "unit", "better"] + systems + [f"{subject}/{b}" for b in baselines]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for key, label, unit, higher, dec in METRICS:
        by = res.get(key, {})
        if not by:
            continue
        cells = [label, unit, "higher" if higher else "lower"]
        for s in systems:
            reps = by.get(s, {})
            cells.append(fmt(statistics.median(reps.values()), dec) if reps else "—")
        for b in baselines:
            r = paired_ratio(res, key, subject, [b], lambda ds: ds[0])
            cells.append("—" if r is None else f"{r:.2f}x")
        out.append("| " + " | ".join(cells) + " |")
    print("\n".join(out))

    # wrk errors are not a metric, but a column that "won" with errors did not win.
    notes = []
    for key in ("cps_errors", "ka_errors"):
        for s, reps in res.get(key, {}).items():
            bad = {r: int(v) for r, v in reps.items() if v > 0}
            if bad:
                notes.append(f"- {s}: wrk reported errors in `{key}` (rep: count) {bad}")
    if notes:
        print("\nWarnings:\n" + "\n".join(notes))

    if args.pair:
        pair_report(res, systems, subject, args.pair)
    if not args.targets:
        return
    comp = [c for c in ("HAPROXY", "HAPROXY_SPLICE", "NGINX") if c in systems]
    if subject not in systems or not comp:
        return
    print(f"\nTargets for {subject} (median of per-repetition paired ratios):\n")
    lines = []

    def check(desc, ratio, ok):
        if ratio is None:
            lines.append(f"- {desc}: no data")
        else:
            lines.append(f"- {'PASS' if ok(ratio) else 'MISS'} {desc}: {ratio:.2f}x")

    for key in THROUGHPUT:
        label = next(m[1] for m in METRICS if m[0] == key)
        r = paired_ratio(res, key, subject, comp, max)
        check(f"{label} >= 1.0x best of {'/'.join(comp)}", r, lambda x: x >= 1.0)
    for key in ("pp_add_p50_us", "pp_add_p99_us"):
        label = next(m[1] for m in METRICS if m[0] == key)
        r = paired_ratio(res, key, subject, comp, min)
        check(f"{label} <= 1.0x best of {'/'.join(comp)}", r, lambda x: x <= 1.0)
    if "DIRECT" in systems:
        for key in ("bulk1_gbps", "bulk8_gbps"):
            label = next(m[1] for m in METRICS if m[0] == key)
            r = paired_ratio(res, key, subject, ["DIRECT"], lambda ds: ds[0])
            check(f"{label} >= 0.75x DIRECT", r, lambda x: x >= 0.75)
    if "HAPROXY" in systems:
        r = paired_ratio(res, "idle_kib", subject, ["HAPROXY"], lambda ds: ds[0])
        check("RSS per idle connection <= HAPROXY", r, lambda x: x <= 1.0)
    if "HAPROXY_SPLICE" in systems:
        r = paired_ratio(res, "cpu_s_per_gb", subject, ["HAPROXY_SPLICE"], lambda ds: ds[0])
        check("CPU per GB <= HAPROXY_SPLICE", r, lambda x: x <= 1.0)
    print("\n".join(lines))

    # Extra columns (WEIGHBRIDGE_COPY, WEIGHBRIDGE_CC, WEIGHBRIDGE_PP) are outside the targets,
    # which are about the defaults; the rows their option touches, paired the same way, say
    # what it would change: bulk rows for the first two, the HTTP rows (the only backends that
    # read a PROXY header) for the last.
    extra = [s for s in systems if s not in (subject, "DIRECT", *comp, args.pair)]
    if not extra:
        return
    print("\nOther columns (median of per-repetition paired ratios):\n")
    for s in extra:
        keys = ("cps", "ka_rps", "cps_cpu_us") if s == "WEIGHBRIDGE_PP" else ("bulk1_gbps", "bulk8_gbps")
        for key in keys:
            label = next(m[1] for m in METRICS if m[0] == key)
            parts = []
            for name, against, pick in (
                ("DIRECT", ["DIRECT"], lambda ds: ds[0]),
                (f"best of {'/'.join(comp)}", comp, max),
                (subject, [subject], lambda ds: ds[0]),
            ):
                if all(a in systems for a in against):
                    r = paired_ratio(res, key, s, against, pick)
                    parts.append(f"{'no data' if r is None else f'{r:.2f}x'} {name}")
            print(f"- {s} {label}: {', '.join(parts)}")


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ports")
    a.add_argument("n", type=int)
    a.set_defaults(fn=cmd_ports)
    a = sub.add_parser("echo")
    a.add_argument("ports")
    a.set_defaults(fn=cmd_echo)
    a = sub.add_parser("pingpong")
    a.add_argument("--labels", required=True, help="comma-separated system names")
    a.add_argument("--ports", required=True, help="comma-separated ports, one per label")
    a.add_argument("--count", type=int, default=20000, help="messages per system")
    a.add_argument("--size", type=int, default=64)
    a.add_argument("--conns", type=int, default=4, help="connections per system")
    a.add_argument("--blocks", type=int, default=20, help="interleaving blocks")
    a.add_argument("--warmup", type=int, default=200)
    a.add_argument("--timeout", type=float, default=5.0)
    a.set_defaults(fn=cmd_pingpong)
    a = sub.add_parser("idle")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--root", type=int, required=True)
    a.add_argument("--conns", type=int, default=5000)
    a.add_argument("--settle", type=float, default=1.0)
    a.add_argument("--timeout", type=float, default=60.0)
    a.set_defaults(fn=cmd_idle)
    a = sub.add_parser("other-cpu")
    a.add_argument("--root", type=int, required=True)
    a.set_defaults(fn=cmd_other_cpu)
    a = sub.add_parser("cpu")
    a.add_argument("--root", type=int, required=True)
    a.set_defaults(fn=cmd_cpu)
    a = sub.add_parser("parse-iperf")
    a.add_argument("file")
    a.set_defaults(fn=cmd_parse_iperf)
    a = sub.add_parser("parse-wrk")
    a.add_argument("file")
    a.set_defaults(fn=cmd_parse_wrk)
    a = sub.add_parser("report")
    a.add_argument("results")
    a.add_argument("--systems", required=True)
    a.add_argument("--subject", required=True)
    a.add_argument("--baselines", default="")
    a.add_argument("--targets", action="store_true")
    a.add_argument("--pair", default="", help="a system to compare the subject with round by round")
    a.set_defaults(fn=cmd_report)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
