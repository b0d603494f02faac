#!/usr/bin/env python3
"""Where the app's CPU time per request goes, against the control's, from a BENCH_PERF=1 run kept
with BENCH_KEEP=1: perf's samples grouped by library/crate, times each server's CPU time per
request from the results JSON.

    perf_breakdown.py RESULTS_JSON WORK_DIR CONNECTIONS
"""
import collections
import json
import re
import subprocess
import sys

d = json.load(open(sys.argv[1]))
work = sys.argv[2]
cpu = {(p["tool"], p["workload"], p["connections"]): p.get("cpu_us_per_request") for p in d["points"]}
CAT = [("kernel", lambda k: k == "kernel"), ("libc (malloc, memcpy)", lambda k: k.startswith("libc") or k == "[vdso]"),
       ("runtime (tokio, futures, std, alloc)", lambda k: k.split(":")[-1] in ("tokio", "futures_util", "std/core/alloc", "mio", "futures_core", "actix_rt")),
       ("HTTP (actix, http, bytes, regex)", lambda k: k.split(":")[-1].startswith(("actix", "http", "bytes", "regex", "h2", "mime", "memchr"))),
       ("driver (sqlx)", lambda k: k.split(":")[-1].startswith("sqlx")),
       ("tracing", lambda k: k.split(":")[-1].startswith("tracing")),
       ("SeaORM, sea-query", lambda k: k.split(":")[-1].startswith("sea_")),
       ("app's own code / control's", lambda k: k.split(":")[-1] in ("app", "control")),
       ("serde, json", lambda k: k.split(":")[-1].startswith("serde")),
       ]
def shares(path):
    out = subprocess.run(["perf", "report", "-i", path, "--no-children", "--stdio", "-g", "none",
                          "--sort", "dso,sym", "--percent-limit", "0"], capture_output=True, text=True).stdout
    agg = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
        if not m: continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(4).strip()
        if dso in ("app", "control"):
            s = re.sub(r"^(dyn |mut |const )", "", sym.lstrip("<&*( "))
            c = re.split(r"::|<| ", s, 1)[0] or "?"
            if c in ("core", "alloc", "std"): c = "std/core/alloc"
            key = dso + ":" + c
        elif dso.startswith("[kernel"): key = "kernel"
        else: key = dso
        agg[key] += pct
    cats = collections.Counter()
    for k, v in agg.items():
        for name, f in CAT:
            if f(k): cats[name] += v; break
        else: cats["other"] += v
    return cats
c = int(sys.argv[3])
for w in ("W1", "W2"):
    a = shares(f"{work}/perf-app-{w}-{c}.data"); b = shares(f"{work}/perf-control-{w}-{c}.data")
    ca, cb = cpu[("app", w, c)], cpu[("control", w, c)]
    print(f"\n{w} at {c}: CPU µs/request app {ca}, control {cb}")
    print("| where | app µs/req | control µs/req | difference |\n|---|---:|---:|---:|")
    for name in [n for n, _ in CAT] + ["other"]:
        x, y = a[name] * ca / 100, b[name] * cb / 100
        print(f"| {name} | {x:.0f} | {y:.0f} | {x - y:+.0f} |")
