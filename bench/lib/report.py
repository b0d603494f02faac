#!/usr/bin/env python3
"""Assembles a run's results: RESULTS/STAMP.json and latest.json (everything), latest.md (the
table, also printed).

    report.py META_JSON POINTS_JSONL CHECKS_JSONL RESULTS_DIR STAMP
"""
import json
import os
import shutil
import sys

ORDER = ["W1", "W2", "W3", "W3o", "W4", "W5"]
TITLES = {
    "W1": "GET /products/{id}",
    "W2": "POST /transfers, random product and warehouses",
    "W3": "POST /transfers, one product, two warehouses, both directions",
    "W3o": "POST /transfers, one product, two warehouses, one direction",
    "W4": "GET /health/ready",
    "W5": "POST /receipts, then GET /products/{id}/stock with its Consistency-Token",
}


def fmt(x, digits=1):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}"


def merge_rounds(points):
    """One point per (tool, workload, connections): the rounds of BENCH_ROUNDS summed (requests,
    statuses, counters), CPU per request over all of them, rates and latencies averaged; each
    round's own figures are kept under "rounds"."""
    groups = {}
    for p in points:
        groups.setdefault((p.get("tool"), p["workload"], p["connections"]), []).append(p)
    merged = []
    for ps in groups.values():
        if len(ps) == 1:
            merged.append(ps[0])
            continue
        m = dict(ps[0])
        n = sum(q.get("requests") or 0 for q in ps)
        m["requests"] = n
        for key in ("rps", "tps"):
            xs = [q[key] for q in ps if q.get(key) is not None]
            if xs:
                m[key] = sum(xs) / len(xs)
        lat = [q.get("latency_ms") or {} for q in ps]
        m["latency_ms"] = {k: sum(l.get(k) or 0 for l in lat) / len(lat) for k in lat[0]}
        for key in ("non_2xx", "failed", "app_retries", "app_rollbacks", "app_commits",
                    "app_reads_replica", "app_reads_primary", "deadlocks", "pgbouncer_queries",
                    "replica_xacts", "app_log_lines"):
            if any(key in q for q in ps):
                m[key] = sum(q.get(key) or 0 for q in ps)
        if any("status" in q for q in ps):
            m["status"] = {}
            for q in ps:
                for k, v in (q.get("status") or {}).items():
                    m["status"][k] = m["status"].get(k, 0) + (v or 0)
        for key in ("cpu_us_per_request", "postgres_cpu_us_per_request"):
            if n and all(q.get(key) is not None and q.get("requests") for q in ps):
                m[key] = round(sum(q[key] * q["requests"] for q in ps) / n, 1)
        if m.get("pgbouncer_queries") is not None and n:
            m["round_trips_per_request"] = round(m["pgbouncer_queries"] / n, 2)
        m["peak_rss_mb"] = max((q.get("peak_rss_mb") or 0) for q in ps)
        m["drained"] = all(q.get("drained") is not False for q in ps)
        m["rounds"] = [{k: q.get(k) for k in ("round", "requests", "rps", "tps", "cpu_us_per_request")}
                       for q in ps]
        merged.append(m)
    return merged


def messages_per_request(trace, requests=3):
    """Messages a request sent, from the statement log of `requests` requests: each logged
    simple query (`statement:`, several statements in one message counting once) or execution
    of a prepared statement. The pool's release `Sync` is not logged (one per request, for the
    app and the control alike)."""
    if not trace:
        return None
    n = sum(1 for line in trace if "LOG:  statement:" in line or "LOG:  execute" in line)
    return round(n / requests, 2)


def headline(points, meta):
    """CPU per request of the app and the control at each W1/W2 point, their ratio over all
    rounds and in each round, the throughput ratio, and the messages per request; with
    BENCH_TELEMETRY=1, also the app's ratio to the control that logs and counts each request."""
    by = {(p.get("tool"), p["workload"], p["connections"]): p for p in points}
    trace = meta.get("sql_trace", {})
    rows = []
    for (t, w, c), p in sorted(by.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), kv[0][2])):
        if t not in ("app", "app-pgbouncer") or w not in ("W1", "W2"):
            continue
        ctl = by.get((t.replace("app", "control"), w, c))
        if not ctl:
            continue
        app_cpu, ctl_cpu = p.get("cpu_us_per_request"), ctl.get("cpu_us_per_request")
        logged = by.get(("control-telemetry", w, c)) if t == "app" else None
        logged_cpu = (logged or {}).get("cpu_us_per_request")
        per_round = []
        for a, b in zip(p.get("rounds") or [p], ctl.get("rounds") or [ctl]):
            if a.get("cpu_us_per_request") and b.get("cpu_us_per_request"):
                per_round.append(round(a["cpu_us_per_request"] / b["cpu_us_per_request"], 2))
        rows.append({
            "workload": w if t == "app" else f"{w} through PgBouncer", "connections": c,
            "app_cpu_us": app_cpu, "control_cpu_us": ctl_cpu,
            "cpu_ratio": round(app_cpu / ctl_cpu, 3) if app_cpu and ctl_cpu else None,
            "cpu_ratio_per_round": per_round,
            "rps_ratio": round(p["rps"] / ctl["rps"], 3) if p.get("rps") and ctl.get("rps") else None,
            "control_telemetry_cpu_us": logged_cpu,
            "cpu_ratio_telemetry": round(app_cpu / logged_cpu, 3) if app_cpu and logged_cpu else None,
            # Through PgBouncer: its own count of queries per request (bench/run's pgb_queries).
            "app_messages": messages_per_request(trace.get(f"app_{w}")) if t == "app"
            else p.get("round_trips_per_request"),
            "control_messages": messages_per_request(trace.get(f"control_{w}")) if t == "app"
            else ctl.get("round_trips_per_request"),
        })
    return rows


def main():
    meta_path, points_path, checks_path, results, stamp = sys.argv[1:6]
    meta = json.load(open(meta_path))
    points = [json.loads(line) for line in open(points_path) if line.strip()]
    checks = [json.loads(line) for line in open(checks_path) if line.strip()]

    for p in points:
        if str(p.get("tool")).startswith("app"):
            b, a = p.pop("metrics_before", {}) or {}, p.pop("metrics_after", {}) or {}
            p["app_retries"] = int(a.get("retries", 0) - b.get("retries", 0))
            p["app_rollbacks"] = int(a.get("rollback", 0) - b.get("rollback", 0))
            p["app_commits"] = int(a.get("commit", 0) - b.get("commit", 0))
            # Read-only transactions by server (db_reads_total{target}).
            p["app_reads_replica"] = int(a.get("reads_replica", 0) - b.get("reads_replica", 0))
            p["app_reads_primary"] = int(a.get("reads_primary", 0) - b.get("reads_primary", 0))

    for p in points:
        # CPU time per request: of the HTTP server's process, and of all PostgreSQL processes.
        b, a = p.pop("cpu_before", None), p.pop("cpu_after", None)
        if isinstance(b, dict) and isinstance(a, dict) and p.get("requests"):
            n = p["requests"]
            p["cpu_us_per_request"] = round((a["proc_s"] - b["proc_s"]) * 1e6 / n, 1)
            p["postgres_cpu_us_per_request"] = round((a["postgres_s"] - b["postgres_s"]) * 1e6 / n, 1)
            span = a["machine_s"] - b["machine_s"]
            if span > 0:
                p["machine_busy"] = round((a["machine_busy_s"] - b["machine_busy_s"]) / span, 3)
        # Through PgBouncer: its query count (request-reply cycles on server connections) per
        # request, the round trips per request (see pgb_queries in bench/run).
        if p.get("pgbouncer_queries") is not None and p.get("requests"):
            p["round_trips_per_request"] = round(p["pgbouncer_queries"] / p["requests"], 2)
    points = merge_rounds(points)
    head = headline(points, meta)
    by = {(p.get("tool"), p["workload"], p["connections"]): p for p in points}

    def rate(tool, w, c):
        q = by.get((tool, w, c)) or {}
        return q.get("rps", q.get("tps"))

    def ratio_of(a, b):
        return a / b if a is not None and b else None

    pg = {(w, c): q for (t, w, c), q in by.items() if t == "pgbench"}
    rows = []
    for p in points:
        if p.get("tool") != "app":
            continue
        q = pg.get((p["workload"], p["connections"]))
        ctl = by.get(("control", p["workload"], p["connections"]))
        st = p.get("status", {})
        lat = p.get("latency_ms", {})
        ratio = None
        if q and q.get("tps") and p.get("rps") is not None:
            ratio = p["rps"] / q["tps"]
            p["ratio_to_pgbench"] = round(ratio, 3)
        rows.append({
            "workload": p["workload"], "connections": p["connections"],
            "rps": p.get("rps"), "p50": lat.get("p50"), "p99": lat.get("p99"),
            "non_2xx": p.get("non_2xx"), "c5xx": st.get("c5xx"), "c503": st.get("c503"),
            "c409": st.get("c409"), "timeouts": p.get("socket_errors", {}).get("timeout"),
            "rss": p.get("peak_rss_mb"), "pg_tps": q.get("tps") if q else None,
            "pg_p50": (q or {}).get("latency_ms", {}).get("p50"),
            "pg_p99": (q or {}).get("latency_ms", {}).get("p99"),
            "ratio": ratio, "drained": p.get("drained"),
            "control_rps": (ctl or {}).get("rps"),
            "control_p50": (ctl or {}).get("latency_ms", {}).get("p50"),
            "control_p99": (ctl or {}).get("latency_ms", {}).get("p99"),
            "control_non_2xx": (ctl or {}).get("non_2xx"),
            "control_rss": (ctl or {}).get("peak_rss_mb"),
            "ratio_to_control": ratio_of(p.get("rps"), (ctl or {}).get("rps")),
            "cpu_us": p.get("cpu_us_per_request"),
            "control_cpu_us": (ctl or {}).get("cpu_us_per_request"),
        })
        if rows[-1]["ratio_to_control"] is not None:
            p["ratio_to_control"] = round(rows[-1]["ratio_to_control"], 3)
    rows.sort(key=lambda r: (ORDER.index(r["workload"]) if r["workload"] in ORDER else 99,
                             r["connections"]))

    m = meta["machine"]
    lines = [
        f"Run {meta['started']} on {m['nproc']} cores, {m['mem_total_gib']} GiB ({m['cpu_model']}); "
        f"app {meta['app']['commit'][:10]}{' (dirty tree)' if meta['app']['dirty'] else ''}; "
        f"PostgreSQL {meta['settings']['postgres']['version']}; "
        f"{meta['settings']['duration_s']} s per point"
        f"{', ' + str(meta['settings'].get('rounds')) + ' rounds (A/B/A/B) at W1 and W2' if meta['settings'].get('rounds', 1) > 1 else ''}.",
        "",
    ]
    telemetry = any(r["cpu_ratio_telemetry"] for r in head)
    if head:
        lines += [
            "CPU time of the server process per request (µs), the app against the control, and the "
            "messages each request sends PostgreSQL (from the statement log; plus the pool's "
            "release `Sync`, one for both):",
            "",
            "| workload | connections | app CPU µs/req | control | app/control | per round | "
            "throughput app/control | messages app | control |"
            + (" control-telemetry CPU µs/req | app/control-telemetry |" if telemetry else ""),
            "|---|---:|---:|---:|---:|---|---:|---:|---:|" + ("---:|---:|" if telemetry else ""),
        ]
        for r in head:
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["workload"], r["connections"], fmt(r["app_cpu_us"], 0), fmt(r["control_cpu_us"], 0),
                fmt(r["cpu_ratio"], 2), ", ".join(f"{x:.2f}" for x in r["cpu_ratio_per_round"]) or "–",
                fmt(r["rps_ratio"], 2), fmt(r["app_messages"], 0), fmt(r["control_messages"], 0))
                + (" {} | {} |".format(fmt(r["control_telemetry_cpu_us"], 0), fmt(r["cpu_ratio_telemetry"], 2))
                   if telemetry else ""))
        lines.append("")
    lines += [
        "| workload | connections | app req/s | p50 ms | p99 ms | non-2xx | 5xx | peak RSS MB "
        "| control req/s | pgbench TPS | app/control | app/pgbench | CPU µs/req app | control |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["workload"], r["connections"], fmt(r["rps"], 0), fmt(r["p50"], 2), fmt(r["p99"], 2),
            fmt(r["non_2xx"]), fmt(r["c5xx"]), fmt(r["rss"], 1), fmt(r["control_rps"], 0),
            fmt(r["pg_tps"], 0), fmt(r["ratio_to_control"], 2), fmt(r["ratio"], 2),
            fmt(r["cpu_us"], 0), fmt(r["control_cpu_us"], 0)))
    lines.append("")
    # The levers: each variant (over a Unix socket, through PgBouncer, ...) against its target
    # over TCP at the same point of the same run.
    levers = []
    for (t, w, c), q in sorted(by.items(), key=lambda kv: (
            ORDER.index(kv[0][1]) if kv[0][1] in ORDER else 99, kv[0][2], str(kv[0][0]))):
        if not t or "-" not in t:
            continue
        base = t.split("-", 1)[0]
        levers.append({"workload": w, "connections": c, "variant": t, "base": base,
                       "rate": rate(t, w, c), "base_rate": rate(base, w, c),
                       "ratio": ratio_of(rate(t, w, c), rate(base, w, c)),
                       "non_2xx": q.get("non_2xx", q.get("failed")),
                       "round_trips": q.get("round_trips_per_request")})
    if levers:
        lines += [
            "| workload | connections | variant | req/s or TPS | non-2xx or failed | against | its req/s or TPS | ratio "
            "| PgBouncer queries/req |",
            "|---|---:|---|---:|---:|---|---:|---:|---:|",
        ]
        for r in levers:
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["workload"], r["connections"], r["variant"], fmt(r["rate"], 0), fmt(r["non_2xx"]), r["base"],
                fmt(r["base_rate"], 0), fmt(r["ratio"], 2), fmt(r["round_trips"], 2)))
        lines.append("")
    # With a replica: where the reads went, against the same point without one.
    replica_rows = []
    for (t, w, c), q in sorted(by.items(), key=lambda kv: (
            ORDER.index(kv[0][1]) if kv[0][1] in ORDER else 99, kv[0][2], str(kv[0][0]))):
        if t not in ("app", "app-replica") or w not in ("W1", "W5"):
            continue
        if t == "app" and ("app-replica", w, c) not in by:
            continue
        on_replica, on_primary = q.get("app_reads_replica", 0), q.get("app_reads_primary", 0)
        replica_rows.append({
            "workload": w, "connections": c, "tool": t, "rate": rate(t, w, c),
            "non_2xx": q.get("non_2xx"), "reads_replica": on_replica, "reads_primary": on_primary,
            "replica_share": ratio_of(on_replica, on_replica + on_primary),
            "replica_xacts": q.get("replica_xacts"),
            "ratio_to_app_w1": ratio_of(rate(t, w, c), rate("app", "W1", c)),
        })
    if replica_rows:
        lines += [
            "| workload | connections | server | req/s | non-2xx | reads on replica | on primary "
            "| replica share | replica's own xact count | req/s ÷ app W1 (no replica) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in replica_rows:
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["workload"], r["connections"], r["tool"], fmt(r["rate"], 0), fmt(r["non_2xx"]),
                fmt(r["reads_replica"]), fmt(r["reads_primary"]),
                "–" if r["replica_share"] is None else f"{r['replica_share']:.0%}",
                fmt(r["replica_xacts"]), fmt(r["ratio_to_app_w1"], 2)))
        lines.append("")
    lines.append("Workloads: " + "; ".join(f"{k} {v}" for k, v in TITLES.items()) + ".")
    notes = []
    for c in checks:
        notes.append(f"ledger after {c['workload']}: {'pass' if c['pass'] else 'FAIL'}")
    undrained = [f"{p['workload']}/{p['connections']} ({p['tool']})" for p in points
                 if p.get("drained") is False]
    if undrained:
        notes.append("did not drain within the deadline: " + ", ".join(undrained))
    notes.append(f"deadlocks: {meta.get('deadlocks_total', 0)}")
    errs = [f"{p['workload']}/{p['connections']} ({p['tool']}): {p['error']}" for p in points if p.get("error")]
    if errs:
        notes.append("errors: " + "; ".join(errs))
    lines.append("Checks: " + "; ".join(notes) + ".")
    md = "\n".join(lines) + "\n"

    result = dict(meta)
    result["workloads"] = TITLES
    result["points"] = points
    result["checks"] = checks
    result["ledger_pass"] = all(c["pass"] for c in checks)
    result["headline"] = head
    result["table"] = rows
    result["levers"] = levers
    result["replica"] = replica_rows
    os.makedirs(results, exist_ok=True)
    out = os.path.join(results, f"{stamp}.json")
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    shutil.copyfile(out, os.path.join(results, "latest.json"))
    with open(os.path.join(results, "latest.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
