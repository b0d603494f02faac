#!/usr/bin/env python3
"""Helpers for bench/profile (standard library only).

    profile.py drive PORT WORKLOAD REQUESTS CLIENTS IDS_JSON
        REQUESTS requests of W1 (GET /products/{id}) or W2 (POST /transfers) from CLIENTS
        keep-alive connections, ids drawn from the seeder's ids.json; fails on a non-2xx.
    profile.py table EVENT BY TOP NAME=FILE ...
        Self cost per request in EVENT (Ir: instructions; with callgrind's cache simulation also
        I1mr, D1mr, D1mw: first-level cache misses) of each crate (BY=crate) or function
        (BY=function) in callgrind's output FILEs (each measured over the REQUESTS given in the
        file's name as `<...>.<requests>.out`), the first target against the others, largest
        differences first.
"""
import collections
import http.client
import json
import random
import re
import subprocess
import sys
import threading


def drive(port, workload, requests, clients, ids_path):
    ids = json.load(open(ids_path))
    products, warehouses = ids["products"], ids["warehouses"]
    failures = []

    def client(n, seed):
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(n):
            if workload == "W1":
                conn.request("GET", f"/products/{rng.choice(products)}")
            else:
                source, target = rng.sample(warehouses, 2)
                body = {"product_id": rng.choice(products), "from_warehouse_id": source,
                        "to_warehouse_id": target, "quantity": 1}
                conn.request("POST", "/transfers", json.dumps(body),
                             {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status >= 300:
                failures.append(response.status)

    per_client = requests // clients
    threads = [threading.Thread(target=client, args=(per_client, i)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        sys.exit(f"{len(failures)} of {per_client * clients} requests failed: {failures[:5]}")


LINE = re.compile(r"\s*([\d,]+) \([^)]*\)\s+(.*)$")


def crate_of(function):
    """The crate of a demangled Rust symbol, or the C function's name (libc's allocator and
    copies are their own rows)."""
    name = function.lstrip("<&").replace("dyn ", "").replace("mut ", "")
    first = re.split(r"::|<| ", name)[0]
    if re.fullmatch(r"[A-Z]\w*", first) and " as " in name:
        # `<W as core::fmt::Write>::write_str`, a generic's impl: the trait's crate.
        return crate_of(name.split(" as ", 1)[1])
    return first or function[:40]


def self_cost(path, requests, event, by):
    out = subprocess.run(["callgrind_annotate", "--threshold=100", f"--show={event}",
                          f"--sort={event}", path],
                         capture_output=True, text=True, check=True).stdout
    cost = collections.Counter()
    for line in out.splitlines():
        m = LINE.match(line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        where = re.sub(r" \[[^\]]*\]$", "", m.group(2))
        function = where.split(":", 1)[1] if ":" in where else where
        key = function[:100] if by == "function" else crate_of(function)
        cost[key] += int(m.group(1).replace(",", "")) / requests
    return cost


def table(event, by, top, targets):
    names = [t.split("=", 1)[0] for t in targets]
    costs = []
    for t in targets:
        path = t.split("=", 1)[1]
        requests = int(path.rsplit(".", 2)[-2])
        costs.append(self_cost(path, requests, event, by))
    # Largest differences first; with one target, largest costs first.
    spread = lambda k: max(abs(costs[0][k] - c[k]) for c in costs[1:]) if costs[1:] else costs[0][k]
    keys = sorted(set().union(*costs), key=lambda k: -spread(k))
    header = f"{by + ' (' + event + ' per request)':<60}" + "".join(f"{n:>19}" for n in names)
    print(header + "".join(f"{names[0] + '-' + n:>26}" for n in names[1:]))
    for k in keys[:top]:
        row = f"{k[:59]:<60}" + "".join(f"{c[k]:>19,.0f}" for c in costs)
        print(row + "".join(f"{costs[0][k] - c[k]:>26,.0f}" for c in costs[1:]))
    # memcpy and memset move with how the requests' bytes were split into reads (a `rep movsb`
    # or `rep stosb` counts one instruction per byte), so their sum is shown apart as well.
    copies = lambda c: sum(v for k, v in c.items() if re.match(r"__mem(cpy|move|set)", k))
    for label, total in (("all", lambda c: sum(c.values())),
                         ("all but memcpy/memset", lambda c: sum(c.values()) - copies(c))):
        row = f"{label:<60}" + "".join(f"{total(c):>19,.0f}" for c in costs)
        print(row + "".join(f"{total(costs[0]) - total(c):>26,.0f}" for c in costs[1:]))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "drive":
        drive(int(args[0]), args[1], int(args[2]), int(args[3]), args[4])
    elif command == "table":
        table(args[0], args[1], int(args[2]), args[3:])
    else:
        sys.exit(__doc__)
