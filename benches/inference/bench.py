#!/usr/bin/env python3
"""Load generator and analysis for benches/inference/run.sh. Standard library only (Python >= 3.8).

Subcommands:
  ports N             print N free TCP ports on 127.0.0.1, below the kernel's ephemeral range
                      (so no outgoing connection of the run can take one before it is bound)
  gen                 write a request sequence: Poisson arrivals, log-normal service times and
                      token counts, all from one seed, so every system sees the same requests
  ideal               the same sequence through one central FIFO queue in front of every slot
                      (a discrete-event simulation): the best any balancer could do
  run                 replay a sequence open-loop against one or more ports, one TCP connection
                      per request, and record every request's time to first byte and total time
  report OUT_DIR      the markdown report (and summary.csv) from every run's raw JSON

A request is `GET /v1/completions?service_ms=S&tokens=K` with `Connection: close`; the mock
inference server holds it for a slot, sends its first token after the prefill share of S and
the rest over the remaining time. Times to first byte count from just before the connect.
"""

import argparse
import asyncio
import csv
import glob
import json
import math
import os
import random
import socket
import statistics
import sys
import time


# ----------------------------------------------------------------------------- ports

def cmd_ports(args):
    """N free ports between 10000 and the start of the ephemeral range, picked at random.

    Outgoing connections take their local ports from the ephemeral range: a listening port
    chosen there could be taken by one of the run's thousands of connections between now and
    the bind. Below the range, only another listener can take it, and the bind would say so.
    """
    lo = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    first = 10000 if lo > 12000 else 1024
    candidates = list(range(first, lo))
    random.shuffle(candidates)
    picked = []
    for port in candidates:
        if len(picked) == args.n:
            break
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        picked.append(port)
    if len(picked) < args.n:
        raise SystemExit(f"ports: only {len(picked)} free ports below {lo}")
    print(" ".join(map(str, picked)))


# ----------------------------------------------------------------------------- sequences

def cmd_gen(args):
    """Arrival times (Poisson, rate = rho * capacity / mean), service times (log-normal with
    the given mean and sigma) and token counts (tokens_per_s of service time, at least 1)."""
    rng = random.Random(f"{args.seed}:{args.rho}:{args.n}:{args.capacity}")
    mean = args.mean_ms / 1000.0
    rate = args.rho * args.capacity / mean
    mu = math.log(args.mean_ms) - args.sigma ** 2 / 2
    t = 0.0
    requests = []
    for _ in range(args.n):
        t += rng.expovariate(rate)
        service_ms = min(rng.lognormvariate(mu, args.sigma), 3_600_000.0)
        tokens = max(1, min(1000, round(service_ms / 1000.0 * args.tokens_per_s)))
        requests.append([round(t, 6), round(service_ms, 3), tokens])
    seq = {
        "seed": args.seed, "rho": args.rho, "capacity": args.capacity, "rate": rate,
        "mean_ms": args.mean_ms, "sigma": args.sigma, "requests": requests,
    }
    with open(args.out, "w") as f:
        json.dump(seq, f)
    print(f"{rate:.3f} {t:.3f}")


def load_seq(path):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- ideal

def cmd_ideal(args):
    """One FIFO queue in front of all usable slots: each request takes the slot that frees
    first at its arrival, or waits for it. TTFT = wait + prefill share of its service time."""
    import heapq

    seq = load_seq(args.seq)
    slots = sum(int(s) for s in args.slots.split(",")) - args.hidden
    if slots < 1:
        raise SystemExit("ideal: no usable slot")
    free = [0.0] * slots
    heapq.heapify(free)
    rows = []
    for i, (t, service_ms, _tokens) in enumerate(seq["requests"]):
        s = service_ms / 1000.0
        start = max(t, heapq.heappop(free))
        heapq.heappush(free, start + s)
        wait = start - t
        rows.append([i, t, 0.0, wait + s * args.prefill, wait + s, "ok", ""])
    write_run(args.out, meta_of(args), rows, [], [])


# ----------------------------------------------------------------------------- run

COLUMNS = ["i", "t", "late", "ttfb", "total", "outcome", "backend"]


def meta_of(args):
    meta = {}
    for kv in args.meta or []:
        k, _, v = kv.partition("=")
        meta[k] = v
    return meta


def write_run(path, meta, rows, samples, side):
    with open(path, "w") as f:
        json.dump({"meta": meta, "columns": COLUMNS, "requests": rows, "samples": samples,
                   "side": side}, f)


def parse_answer(data):
    """(outcome, backend) of a complete exchange's bytes."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return "truncated", ""
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return "bad_response", ""
    if parts[1] != b"200":
        return f"status_{parts[1].decode('ascii', 'replace')}", ""
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers and not body.endswith(b"0\r\n\r\n"):
        return "truncated", ""
    marker = body.find(b"served by ")
    if marker < 0:
        return "bad_response", ""
    backend = body[marker + 10:].split(b"\n", 1)[0].decode("ascii", "replace").strip()
    return "ok", backend


class Pending:
    """Clients that have sent their request and received nothing yet."""
    n = 0


async def one_request(loop, host, port, payload, timeout, rec):
    """Fills rec: ttfb, total, outcome, backend. Times from just before the connect."""
    start = loop.time()
    rec["start"] = start
    got_any = False
    data = bytearray()

    async def exchange():
        nonlocal got_any
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(payload)
            await writer.drain()
            Pending.n += 1
            try:
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    if not got_any:
                        got_any = True
                        Pending.n -= 1
                        rec["ttfb"] = loop.time() - start
                    data.extend(chunk)
            finally:
                if not got_any:
                    Pending.n -= 1
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    try:
        await asyncio.wait_for(exchange(), timeout)
        rec["total"] = loop.time() - start
        if not got_any:
            rec["outcome"] = "closed"  # the peer closed (FIN) without a byte of answer
        else:
            rec["outcome"], rec["backend"] = parse_answer(bytes(data))
    except asyncio.TimeoutError:
        rec["total"] = loop.time() - start
        rec["outcome"] = "timeout"
    except ConnectionRefusedError:
        rec["total"] = loop.time() - start
        rec["outcome"] = "refused"
    except (ConnectionResetError, BrokenPipeError):
        rec["total"] = loop.time() - start
        # A close with the request still unread in the balancer's socket reaches the client
        # as a reset rather than a FIN.
        rec["outcome"] = "truncated" if got_any else "reset"
    except OSError as e:
        rec["total"] = loop.time() - start
        rec["outcome"] = f"error_{e.errno or type(e).__name__}"


def descendants(root):
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rss_kib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


async def admin_gauge(port, name, timeout=1.0):
    """Sum of the metric NAME over its label sets on the admin endpoint; None if absent."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                                timeout)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(-1), timeout)
        writer.close()
    except (OSError, asyncio.TimeoutError):
        return None
    total, found = 0.0, False
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            try:
                total += float(line.rsplit(None, 1)[1])
                found = True
            except (ValueError, IndexError):
                pass
    return total if found else None


async def sampler(loop, t0, args, samples, stop):
    pids = descendants(args.sample_root) if args.sample_root else []
    while not stop.is_set():
        queue = None
        if args.admin_port:
            queue = await admin_gauge(args.admin_port, args.queue_metric)
        samples.append([round(loop.time() - t0, 3), rss_kib(pids) if pids else None, queue,
                        Pending.n])
        try:
            await asyncio.wait_for(stop.wait(), args.sample_interval)
        except asyncio.TimeoutError:
            pass


async def side_requests(loop, t0, args, side, stop):
    """One small request every side_interval through another listener: its latency shows
    whether the balancer slows down for clients that are not in the overloaded pool."""
    payload = (b"GET /side?service_ms=0&tokens=1 HTTP/1.1\r\nHost: bench\r\n"
               b"Connection: close\r\n\r\n")
    while not stop.is_set():
        rec = {}
        await one_request(loop, "127.0.0.1", args.side_port, payload, 10.0, rec)
        side.append([round(rec["start"] - t0, 3), rec.get("total"), rec["outcome"]])
        try:
            await asyncio.wait_for(stop.wait(), args.side_interval)
        except asyncio.TimeoutError:
            pass


async def run(args):
    seq = load_seq(args.seq)
    ports = [int(p) for p in args.ports.split(",")]
    loop = asyncio.get_running_loop()
    reqs = seq["requests"]
    recs = [dict() for _ in reqs]
    samples, side = [], []
    stop = asyncio.Event()
    # Arrivals are scheduled from t0, `lead` seconds from now: samples and side requests made
    # before t0 are the idle baseline.
    t0 = loop.time() + args.lead
    background = []
    if args.sample_root or args.admin_port:
        background.append(asyncio.ensure_future(sampler(loop, t0, args, samples, stop)))
    if args.side_port:
        background.append(asyncio.ensure_future(side_requests(loop, t0, args, side, stop)))
    tasks = []
    for i, (t, service_ms, tokens) in enumerate(reqs):
        due = t0 + t
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        recs[i]["late"] = loop.time() - due
        payload = (f"GET /v1/completions?service_ms={service_ms}&tokens={tokens} HTTP/1.1\r\n"
                   f"Host: bench\r\nConnection: close\r\n\r\n").encode()
        # Requests alternate between the ports (several balancer replicas).
        port = ports[i % len(ports)]
        tasks.append(asyncio.ensure_future(
            one_request(loop, "127.0.0.1", port, payload, args.timeout, recs[i])))
    await asyncio.gather(*tasks)
    # A little idle time after the last answer, for the samples to show the queue drained.
    await asyncio.sleep(args.tail)
    stop.set()
    await asyncio.gather(*background)
    rows = []
    for i, ((t, _s, _k), r) in enumerate(zip(reqs, recs)):
        rows.append([i, t, round(r.get("late", 0.0), 6), r.get("ttfb"), r.get("total"),
                     r.get("outcome", "missing"), r.get("backend", "")])
    write_run(args.out, meta_of(args), rows, samples, side)
    ok = sum(1 for r in rows if r[5] == "ok")
    print(f"{ok}/{len(rows)} ok")


def cmd_run(args):
    asyncio.run(run(args))


# ----------------------------------------------------------------------------- statistics

def percentile(sorted_values, q):
    """Nearest-rank percentile of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def summarize(run):
    """Per-run figures (milliseconds)."""
    cols = run["columns"]
    ix = {c: i for i, c in enumerate(cols)}
    rows = run["requests"]
    ok = [r for r in rows if r[ix["outcome"]] == "ok"]
    ttfb = sorted(r[ix["ttfb"]] * 1000 for r in ok if r[ix["ttfb"]] is not None)
    total = sorted(r[ix["total"]] * 1000 for r in ok if r[ix["total"]] is not None)
    outcomes = {}
    for r in rows:
        outcomes[r[ix["outcome"]]] = outcomes.get(r[ix["outcome"]], 0) + 1
    late = sorted(r[ix["late"]] * 1000 for r in rows)
    backends = {}
    for r in ok:
        backends[r[ix["backend"]]] = backends.get(r[ix["backend"]], 0) + 1
    return {
        "n": len(rows), "completed": len(ok), "errors": len(rows) - len(ok),
        "outcomes": outcomes,
        "ttft_p50": percentile(ttfb, 50), "ttft_p99": percentile(ttfb, 99),
        "ttft_max": ttfb[-1] if ttfb else None,
        "total_p50": percentile(total, 50), "total_p99": percentile(total, 99),
        "late_p99": percentile(late, 99), "late_max": late[-1] if late else None,
        "backends": backends,
    }


# ----------------------------------------------------------------------------- report

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, dec=0):
    if v is None:
        return "—"
    return f"{v:,.{dec}f}"


def load_runs(out_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "raw", "*.json"))):
        with open(path) as f:
            run = json.load(f)
        run["summary"] = summarize(run)
        run["path"] = path
        runs.append(run)
    return runs


# p99 lateness of request starts beyond which a run is flagged.
LATE_WARN_MS = 10

ROWS = [
    ("completed", "requests completed", 0),
    ("errors", "errors (refused, reset, closed, timeout, non-200)", 0),
    ("ttft_p50", "TTFT p50 (ms)", 0),
    ("ttft_p99", "TTFT p99 (ms)", 0),
    ("total_p50", "total time p50 (ms)", 0),
    ("total_p99", "total time p99 (ms)", 0),
]


def grid_tables(runs, scenario, systems, baselines, out):
    """One table per rho: medians over seeds, paired p99 TTFT ratios against the baselines."""
    mine = [r for r in runs if r["meta"].get("scenario") == scenario]
    rhos = sorted({r["meta"]["rho"] for r in mine}, key=float)
    for rho in rhos:
        at = [r for r in mine if r["meta"]["rho"] == rho]
        present = [s for s in systems if any(r["meta"]["system"] == s for r in at)]
        seeds = sorted({r["meta"]["seed"] for r in at}, key=int)
        by = {(r["meta"]["system"], r["meta"]["seed"]): r["summary"] for r in at}
        meta = at[0]["meta"]
        note = next((r["meta"]["note"] for r in at if r["meta"].get("note")), "")
        rate = float(meta.get("rate", "nan"))
        out.append(f"\n#### {scenario}, ρ = {rho}: {rate:.2f} req/s, "
                   f"{meta.get('n', '?')} requests per run, seeds {' '.join(seeds)}"
                   f"{'; ' + note if note else ''}\n")
        head = ["metric (median over seeds)"] + present
        out.append("| " + " | ".join(head) + " |")
        out.append("|---|" + "---:|" * len(present))
        for key, label, dec in ROWS:
            cells = [label]
            for s in present:
                cells.append(fmt(med([by[(s, sd)][key] for sd in seeds if (s, sd) in by]), dec))
            out.append("| " + " | ".join(cells) + " |")
        ratio_rows = {}
        for b in baselines:
            if b not in present:
                continue
            cells = [f"p99 TTFT / {b} (median of per-seed ratios)"]
            per_seed = {}
            for s in present:
                rs = []
                for sd in seeds:
                    x, y = by.get((s, sd)), by.get((b, sd))
                    if x and y and x["ttft_p99"] is not None and y["ttft_p99"]:
                        rs.append(x["ttft_p99"] / y["ttft_p99"])
                per_seed[s] = rs
                cells.append(f"{med(rs):.2f}x" if rs else "—")
            ratio_rows[b] = per_seed
            out.append("| " + " | ".join(cells) + " |")
        lateness = [by[k]["late_max"] for k in by if by[k]["late_max"] is not None]
        if lateness:
            out.append(f"\nLoad generator: latest start {max(lateness):.1f} ms after its "
                       f"scheduled instant (all runs at this ρ).")
        # A generator that fell behind sent bursts the sequence does not have: such a run
        # measured something else (usually the machine was busy with other work).
        behind = [f"{s} seed {sd} (p99 {by[(s, sd)]['late_p99']:.0f} ms)"
                  for (s, sd) in sorted(by) if (by[(s, sd)]["late_p99"] or 0) > LATE_WARN_MS]
        if behind:
            out.append(f"\n**Warning: the load generator started requests more than "
                       f"{LATE_WARN_MS} ms late (p99) in: {', '.join(behind)}. Compare those "
                       f"runs with care.**")
        if ratio_rows:
            heads, rules = [], []
            for b in ratio_rows:
                heads += [f"/ {b}, seed {sd}" for sd in seeds] + [f"/ {b}, median"]
            out.append("\nPer-seed p99 TTFT ratios (the same requests in each seed):\n")
            out.append("| system | " + " | ".join(heads) + " |")
            out.append("|---|" + "---:|" * len(heads))
            for s in present:
                cells = []
                for b, per_seed in ratio_rows.items():
                    for sd in seeds:
                        x, y = by.get((s, sd)), by.get((b, sd))
                        ok = x and y and x["ttft_p99"] is not None and y["ttft_p99"]
                        cells.append(f"{x['ttft_p99'] / y['ttft_p99']:.2f}" if ok else "—")
                    m = med(per_seed.get(s, []))
                    cells.append(f"{m:.2f}x" if m is not None else "—")
                out.append(f"| {s} | " + " | ".join(cells) + " |")
        errs = []
        for (s, sd), summ in sorted(by.items()):
            bad = {k: v for k, v in summ["outcomes"].items() if k != "ok"}
            if bad:
                errs.append(f"- {s} seed {sd}: {bad}")
        if errs:
            out.append("\nErrors by kind:\n")
            out.extend(errs)


def replicas_table(runs, out):
    mine = [r for r in runs if r["meta"].get("scenario") == "REPLICAS"]
    if not mine:
        return
    meta = mine[0]["meta"]
    out.append(f"\n#### REPLICAS: {meta.get('system')} as one replica and as two (each taking "
               f"every other request), ρ = {meta.get('rho')}, {meta.get('n')} requests per run\n")
    out.append("| seed | one: TTFT p99 (ms) | two: TTFT p99 (ms) | two / one | one: errors | "
               "two: errors |")
    out.append("|---|---:|---:|---:|---:|---:|")
    by = {(r["meta"]["replicas"], r["meta"]["seed"]): r["summary"] for r in mine}
    ratios = []
    for sd in sorted({r["meta"]["seed"] for r in mine}, key=int):
        one, two = by.get(("1", sd)), by.get(("2", sd))
        ratio = None
        if one and two and one["ttft_p99"] and two["ttft_p99"] is not None:
            ratio = two["ttft_p99"] / one["ttft_p99"]
            ratios.append(ratio)
        out.append(f"| {sd} | {fmt(one and one['ttft_p99'])} | {fmt(two and two['ttft_p99'])} | "
                   f"{fmt(ratio, 2)} | {fmt(one and one['errors'])} | "
                   f"{fmt(two and two['errors'])} |")
    if ratios:
        out.append(f"\nMedian two/one p99 TTFT ratio: {med(ratios):.2f}x")


def overload_table(runs, out):
    mine = [r for r in runs if r["meta"].get("scenario") == "OVERLOAD"]
    for run in mine:
        meta, summ = run["meta"], run["summary"]
        cols = {c: i for i, c in enumerate(run["columns"])}
        rows = run["requests"]
        # Only a balancer that queues has a bound on the wait: its queue timeout plus one
        # connect timeout.
        bound = None
        if meta.get("queue_timeout_s"):
            bound = float(meta["queue_timeout_s"]) + float(meta.get("connect_timeout_s", "0"))
        prefill = float(meta.get("prefill", "0"))
        served = [r for r in rows if r[cols["outcome"]] == "ok"]
        closed = [r for r in rows if r[cols["outcome"]] in ("closed", "reset")]
        other = [r for r in rows if r[cols["outcome"]] not in ("ok", "closed", "reset")]
        # The wait of a served client: its time to first byte less the server's prefill.
        service = {}
        seq_path = meta.get("seq")
        if seq_path and os.path.exists(seq_path):
            service = {i: s for i, (_t, s, _k) in enumerate(load_seq(seq_path)["requests"])}
        waits = [r[cols["ttfb"]] - prefill * service.get(r[cols["i"]], 0.0) / 1000.0
                 for r in served if r[cols["ttfb"]] is not None]
        closes = [r[cols["total"]] for r in closed if r[cols["total"]] is not None]
        max_wait = max(waits + closes) if waits or closes else None
        queueing = (f"queue timeout {meta['queue_timeout_s']} s" if bound is not None
                    else "no queue in the balancer (clients wait in the servers)")
        out.append(f"\n#### OVERLOAD: {meta.get('system')}, {meta.get('factor')}× capacity "
                   f"({float(meta.get('rate', 'nan')):.1f} req/s) for {meta.get('seconds')} s, "
                   f"{queueing}, connect timeout {meta.get('connect_timeout_s')} s\n")
        out.append("| figure | value |")
        out.append("|---|---:|")
        out.append(f"| requests offered | {len(rows)} |")
        out.append(f"| served (200, complete) | {len(served)} |")
        kinds = {}
        for r in closed:
            kinds[r[cols["outcome"]]] = kinds.get(r[cols["outcome"]], 0) + 1
        how = ", ".join(f"{v} {'FIN' if k == 'closed' else 'RST'}" for k, v in sorted(kinds.items()))
        out.append(f"| closed without a response | {len(closed)}{' (' + how + ')' if how else ''} |")
        if closes:
            cs = sorted(closes)
            out.append(f"| time to that close: p50 / max (s) | {percentile(cs, 50):.2f} / "
                       f"{cs[-1]:.2f} |")
        other_kinds = {}
        for r in other:
            other_kinds[r[cols["outcome"]]] = other_kinds.get(r[cols["outcome"]], 0) + 1
        out.append(f"| other outcomes | {other_kinds or 0} |")
        if waits:
            out.append(f"| served: longest wait before the slot, TTFB less prefill (s) | "
                       f"{max(waits):.2f} |")
        if max_wait is not None and bound is not None:
            # 0.25 s of slack: timer granularity and the client's own scheduling.
            verdict = "PASS" if max_wait <= bound + 0.25 else "MISS"
            out.append(f"| longest any client waited (s), bound queue + connect timeout "
                       f"= {bound:.1f} s | {max_wait:.2f} {verdict} |")
        elif max_wait is not None:
            out.append(f"| longest any client waited (s) | {max_wait:.2f} |")
        samples = run.get("samples") or []
        before = [s for s in samples if s[0] < 0 and s[1] is not None]
        during = [s for s in samples if s[0] >= 0 and s[1] is not None]
        if before and during:
            rss0 = before[-1][1]
            queue_src = "admin metric"
            if any(s[2] is not None for s in during):
                peak = max(during, key=lambda s: s[2] or 0)
                queued = peak[2] or 0
            else:
                # No queue gauge: clients that sent a request and received nothing, less the
                # slots (those requests are with a server, in their prefill).
                queue_src = "client-side estimate: clients without a byte, less the slots"
                peak = max(during, key=lambda s: s[3])
                queued = max(0, peak[3] - int(meta.get("slots_total", "0")))
            rss_max = max(s[1] for s in during)
            out.append(f"| balancer RSS before / at the queue's peak / max (MiB) | "
                       f"{rss0 / 1024:.1f} / {peak[1] / 1024:.1f} / {rss_max / 1024:.1f} |")
            out.append(f"| queued clients at the peak ({queue_src}) | {queued:.0f} |")
            if queued > 0:
                out.append(f"| RSS per queued client (KiB) | {(peak[1] - rss0) / queued:.1f} |")
        side = run.get("side") or []
        if side:
            def lat(xs):
                xs = sorted(x * 1000 for x in xs)
                return (f"{percentile(xs, 50):.1f} / {percentile(xs, 99):.1f} / {xs[-1]:.1f}"
                        if xs else "—")
            end = max((r[cols["t"]] for r in rows), default=0.0)
            idle = [s[1] for s in side if s[0] < 0 and s[2] == "ok"]
            loaded = [s[1] for s in side if 0 <= s[0] <= end and s[2] == "ok"]
            failed = sum(1 for s in side if s[2] != "ok")
            out.append(f"| side listener, other pool: latency p50 / p99 / max (ms), idle | "
                       f"{lat(idle)} |")
            out.append(f"| side listener, other pool: latency p50 / p99 / max (ms), during "
                       f"overload | {lat(loaded)} |")
            out.append(f"| side requests failed | {failed} of {len(side)} |")


def cmd_report(args):
    runs = load_runs(args.out_dir)
    systems = args.systems.split(",") if args.systems else []
    baselines = [b for b in args.baselines.split(",") if b]
    # Everything per run, for other tools.
    with open(os.path.join(args.out_dir, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        keys = ["n", "completed", "errors", "ttft_p50", "ttft_p99", "ttft_max", "total_p50",
                "total_p99", "late_p99", "late_max"]
        w.writerow(["scenario", "rho", "seed", "system", "replicas"] + keys +
                   ["outcomes", "backends", "file"])
        for r in runs:
            m, s = r["meta"], r["summary"]
            w.writerow([m.get("scenario"), m.get("rho"), m.get("seed"), m.get("system"),
                        m.get("replicas", "")] +
                       [("" if s[k] is None else round(s[k], 3)) for k in keys] +
                       [json.dumps(s["outcomes"]), json.dumps(s["backends"]),
                        os.path.basename(r["path"])])
    out = []
    for scenario in ("MAIN", "HIDDEN"):
        grid_tables(runs, scenario, systems, baselines, out)
    replicas_table(runs, out)
    overload_table(runs, out)
    print("\n".join(out))


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ports")
    a.add_argument("n", type=int)
    a.set_defaults(fn=cmd_ports)

    a = sub.add_parser("gen")
    a.add_argument("--seed", type=int, required=True)
    a.add_argument("--rho", type=float, required=True, help="offered load, share of capacity")
    a.add_argument("--n", type=int, required=True, help="requests")
    a.add_argument("--capacity", type=int, required=True, help="slots the rate is based on")
    a.add_argument("--mean-ms", type=float, default=400.0)
    a.add_argument("--sigma", type=float, default=0.6)
    a.add_argument("--tokens-per-s", type=float, default=40.0)
    a.add_argument("--out", required=True)
    a.set_defaults(fn=cmd_gen)

    a = sub.add_parser("ideal")
    a.add_argument("--seq", required=True)
    a.add_argument("--slots", required=True, help="comma-separated slots per server")
    a.add_argument("--hidden", type=int, default=0, help="slots held by a hidden client")
    a.add_argument("--prefill", type=float, default=0.1)
    a.add_argument("--out", required=True)
    a.add_argument("--meta", action="append", help="KEY=VALUE stored with the results")
    a.set_defaults(fn=cmd_ideal)

    a = sub.add_parser("run")
    a.add_argument("--seq", required=True)
    a.add_argument("--ports", required=True, help="comma-separated; requests alternate")
    a.add_argument("--out", required=True)
    a.add_argument("--timeout", type=float, default=120.0, help="client timeout per request")
    a.add_argument("--lead", type=float, default=0.2, help="seconds before the first arrival")
    a.add_argument("--tail", type=float, default=0.0, help="seconds kept after the last answer")
    a.add_argument("--sample-root", type=int, default=0, help="balancer's process tree root")
    a.add_argument("--admin-port", type=int, default=0)
    a.add_argument("--queue-metric", default="weighbridge_pool_queue_length")
    a.add_argument("--sample-interval", type=float, default=0.2)
    a.add_argument("--side-port", type=int, default=0)
    a.add_argument("--side-interval", type=float, default=0.2)
    a.add_argument("--meta", action="append", help="KEY=VALUE stored with the results")
    a.set_defaults(fn=cmd_run)

    a = sub.add_parser("report")
    a.add_argument("out_dir")
    a.add_argument("--systems", default="")
    a.add_argument("--baselines", default="HAPROXY_LC,HAPROXY_MAXCONN")
    a.set_defaults(fn=cmd_report)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
