#!/usr/bin/env python3
"""Draws throughput against concurrency, one panel per workload, from a results JSON.

    chart.py RESULTS_JSON OUT_PNG
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

ORDER = ["W1", "W2", "W3", "W3o", "W4", "W5"]
SHORT = {
    "W1": "GET /products/{id}",
    "W2": "POST /transfers, random rows",
    "W3": "transfers, 1 product, 2 warehouses, both ways",
    "W3o": "transfers, 1 product, 2 warehouses, one way",
    "W4": "GET /health/ready",
    "W5": "receipt, then its stock with the token",
}


def main():
    data = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    points = data["points"]
    workloads = [w for w in ORDER if any(p["workload"] == w for p in points)]
    conns = sorted({p["connections"] for p in points})
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    axes = axes.flatten()
    for ax, w in zip(axes, workloads):
        for tool, key, style, label, dy in (("app", "rps", "o-", "app (wrk, req/s)", 6),
                                            ("app-replica", "rps", "o--", "app with a replica", 6),
                                            ("control", "rps", "^:", "control (bare actix-web + sqlx)", 6),
                                            ("pgbench", "tps", "s--", "pgbench (same SQL, TPS)", -12)):
            ps = sorted((p for p in points if p["workload"] == w and p["tool"] == tool and p.get(key)),
                        key=lambda p: p["connections"])
            if ps:
                xs = [p["connections"] for p in ps]
                ys = [p[key] for p in ps]
                ax.plot(xs, ys, style, label=label)
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, dy),
                                ha="center", fontsize=8)
        ax.set_title(f"{w}: {SHORT.get(w, '')}", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(conns))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v)}"))
        ax.set_xlim(min(conns) / 1.4, max(conns) * 1.4)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.12)
        ax.set_xlabel("client connections")
        ax.set_ylabel("throughput (req/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    for ax in axes[len(workloads):]:
        ax.axis("off")
    if len(workloads) < len(axes):
        s = data["settings"]
        checks = ", ".join(f"{c['workload']} {'pass' if c['pass'] else 'FAIL'}" for c in data["checks"])
        axes[len(workloads)].text(0, 0.95, "\n".join([
            f"{s['duration_s']} s per point, wrk {s['wrk_threads']} threads",
            f"app pool: defaults (10 + 20 overflow)",
            f"PostgreSQL {s['postgres']['version'].split()[0]}, max_connections {s['postgres'].get('max_connections', 1100)},",
            f"shared_buffers 256MB, default durability",
            f"app commit {data['app']['commit'][:10]}{' (dirty)' if data['app']['dirty'] else ''}",
            f"ledger checks: {checks or 'none'}",
            f"deadlocks: {data.get('deadlocks_total', 0)}",
        ]), va="top", fontsize=9, family="monospace", transform=axes[len(workloads)].transAxes)
    m = data["machine"]
    fig.suptitle(f"inventory-api throughput, {data['started'][:16].replace('T', ' ')} UTC — "
                 f"{m['nproc']} cores, {m['mem_total_gib']:.0f} GiB, {m['cpu_model']}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
