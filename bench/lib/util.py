#!/usr/bin/env python3
"""Small helpers for bench/run (standard library only).

    util.py free-port PORT                  first free TCP port on 127.0.0.1 from PORT on
    util.py wait-http URL SECONDS PID       poll until URL answers 200 (fails if PID dies)
    util.py request METHOD URL [JSON]       one request; prints the status
    util.py metrics URL                     the counters bench/run diffs, as JSON
    util.py machine                         nproc, memory, CPU model, as JSON
    util.py wrk-point FILE KEY=VALUE...     the BENCH_JSON line of a wrk run plus fields
    util.py pgbench-point OUT LOGPREFIX KEY=VALUE...   pgbench's summary and p50/p99 from its log
    util.py trace LOGFILE START APPNAME     the statements one client sent, from the server log
    util.py cpu PID                         CPU seconds so far of PID, of all postgres processes
                                            and of the machine (busy, total), as JSON
"""
import glob
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.parse


def free_port(start):
    for port in range(start, start + 200):
        with socket.socket() as s:
            # SO_REUSEADDR as servers set it: a port with only TIME_WAIT connections is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    sys.exit(f"no free port from {start}")


def request(method, url, body=None, timeout=5):
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    c.request(method, u.path + (("?" + u.query) if u.query else ""), body, headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def wait_http(url, seconds, pid):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"the process {pid} exited before {url} was ready")
        try:
            status, _ = request("GET", url, timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} not ready after {seconds} s")


def metrics(url):
    _, data = request("GET", url)
    out = {}
    for line in data.decode().splitlines():
        m = re.match(r'^(db_transaction_retries_total|db_transactions_total\{outcome="(\w+)"\})\s+(\S+)', line)
        if m:
            key = "retries" if m.group(2) is None else m.group(2)
            out[key] = float(m.group(3))
        m = re.match(r'^db_reads_total\{target="(\w+)"\}\s+(\S+)', line)
        if m:
            out["reads_" + m.group(1)] = float(m.group(2))
    return out


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {"nproc": os.cpu_count(), "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
            "cpu_model": cpu, "kernel": os.uname().release}


def typed(v):
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    if v in ("true", "false"):
        return v == "true"
    if v.startswith("{") or v.startswith("["):
        try:
            return json.loads(v)
        except ValueError:
            pass
    return v


def fields(args):
    return {k: typed(v) for k, v in (a.split("=", 1) for a in args)}


def wrk_point(path, args):
    rec = None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("BENCH_JSON "):
                rec = json.loads(line[len("BENCH_JSON "):])
    if rec is None:
        rec = {"error": "no summary from wrk (see the run's log)"}
    rec.update(fields(args))
    return rec


def percentile(sorted_xs, p):
    if not sorted_xs:
        return None
    k = max(0, min(len(sorted_xs) - 1, int(round(p / 100 * len(sorted_xs) + 0.5)) - 1))
    return sorted_xs[k]


def pgbench_point(out_path, log_prefix, args):
    text = open(out_path, errors="replace").read()
    rec = {}

    def grab(pattern, key, conv=float):
        m = re.search(pattern, text, re.M)
        if m:
            rec[key] = conv(m.group(1))

    grab(r"^tps = ([\d.]+) \(without initial connection time\)", "tps")
    grab(r"^number of transactions actually processed: (\d+)", "transactions", int)
    grab(r"^number of failed transactions: (\d+)", "failed", int)
    grab(r"^number of transactions retried: (\d+)", "retried", int)
    grab(r"^latency average = ([\d.]+) ms", "latency_avg_ms")
    grab(r"^latency stddev = ([\d.]+) ms", "latency_stddev_ms")
    grab(r"^initial connection time = ([\d.]+) ms", "connection_time_ms")
    grab(r"^number of clients: (\d+)", "clients", int)
    # -r: per-statement latencies
    stmts = []
    m = re.search(r"statement latencies in milliseconds.*?:\n((?:\s+[\d.]+\s+.*\n?)+)", text)
    if m:
        for line in m.group(1).splitlines():
            mm = re.match(r"\s*([\d.]+)\s+((?:\d+\s+)*)(.*)$", line)
            if mm:
                stmts.append({"ms": float(mm.group(1)), "statement": mm.group(3).strip()[:120]})
    rec["statement_latency_ms"] = stmts
    # p50/p99 from the per-transaction log (-l): "client txno time_us script epoch epoch_us ..."
    lat = []
    for path in glob.glob(log_prefix + ".*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]))
    lat.sort()
    if lat:
        rec["latency_ms"] = {"p50": percentile(lat, 50) / 1e3, "p99": percentile(lat, 99) / 1e3,
                             "max": lat[-1] / 1e3,
                             "mean": sum(lat) / len(lat) / 1e3}
    if "tps" not in rec:
        rec["error"] = "no tps in pgbench's output: " + text.strip()[-500:]
    rec.update(fields(args))
    return rec


def trace(logfile, start, appname):
    """The statement lines (and their parameter DETAIL lines) logged for `appname` from byte
    offset `start` on, without the timestamp and pid."""
    with open(logfile, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        m = re.match(r"^\S+ \S+ \S+ \[(\d+)\] ([^:]*): (.*)$", line)
        if not m or m.group(2) != appname:
            continue
        msg = m.group(3)
        if msg.startswith(("LOG:  statement:", "LOG:  execute", "DETAIL:  parameters:")):
            out.append(f"[{m.group(1)}] {msg}")
    return out


def proc_ticks(pid):
    """utime + stime of one process, in clock ticks; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def cpu(pid):
    hz = os.sysconf("SC_CLK_TCK")
    postgres = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() != "postgres":
                        continue
            except OSError:
                continue
            postgres += proc_ticks(d)
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]
    return {"proc_s": proc_ticks(pid) / hz, "postgres_s": postgres / hz,
            "machine_busy_s": (sum(ticks[:8]) - idle) / hz, "machine_s": sum(ticks[:8]) / hz}


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free-port":
        print(free_port(int(args[0])))
    elif cmd == "wait-http":
        wait_http(args[0], float(args[1]), int(args[2]))
    elif cmd == "request":
        status, data = request(args[0], args[1], args[2] if len(args) > 2 else None)
        print(status)
    elif cmd == "metrics":
        print(json.dumps(metrics(args[0])))
    elif cmd == "machine":
        print(json.dumps(machine()))
    elif cmd == "wrk-point":
        print(json.dumps(wrk_point(args[0], args[1:])))
    elif cmd == "pgbench-point":
        print(json.dumps(pgbench_point(args[0], args[1], args[2:])))
    elif cmd == "cpu":
        print(json.dumps(cpu(args[0])))
    elif cmd == "trace":
        print(json.dumps(trace(args[0], int(args[1]), args[2])))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
