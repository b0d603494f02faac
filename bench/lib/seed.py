#!/usr/bin/env python3
"""Seeds the bench database THROUGH THE HTTP API and writes the ids it got back.

    seed.py HOST PORT OUT_DIR [--warehouses 20] [--products 1000] [--units 1000000]

Creates the warehouses (sequentially), the catalog products (concurrently), two dedicated products
for the hot-row workloads, and one receipt per (catalog product, warehouse), all with keep-alive
connections from a pool of threads (standard library only). Writes OUT_DIR/ids.json and
OUT_DIR/ids.lua (read by the wrk scripts) and prints a one-line JSON summary.
"""
import argparse
import http.client
import json
import os
import queue
import sys
import threading
import time

HOT_UNITS = 1_000_000          # W3: in each of its two warehouses
ONEWAY_UNITS = 100_000_000     # W3o: at the source (a run moves well under 1% of it)


class Client:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.conn = None

    def post(self, path, body, expect=201):
        data = json.dumps(body).encode()
        for attempt in range(3):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                self.conn.request("POST", path, data, {"Content-Type": "application/json"})
                r = self.conn.getresponse()
                payload = r.read()
                if r.status != expect:
                    raise RuntimeError(f"POST {path} {body} -> {r.status}: {payload[:300]!r}")
                return json.loads(payload)
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.2)


def run_parallel(host, port, jobs, threads):
    """Runs `jobs` (list of (path, body)) on `threads` keep-alive connections; returns the
    responses in job order."""
    results = [None] * len(jobs)
    q = queue.Queue()
    for i, job in enumerate(jobs):
        q.put((i, job))
    errors = []

    def worker():
        c = Client(host, port)
        while not errors:
            try:
                i, (path, body) = q.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = c.post(path, body)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("out_dir")
    ap.add_argument("--warehouses", type=int, default=20)
    ap.add_argument("--products", type=int, default=1000)
    ap.add_argument("--units", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=16)
    a = ap.parse_args()

    t0 = time.monotonic()
    c = Client(a.host, a.port)
    warehouses = [c.post("/warehouses", {"code": f"WH-{i:03d}", "name": f"Warehouse {i}"})["id"]
                  for i in range(1, a.warehouses + 1)]
    products = [r["id"] for r in run_parallel(
        a.host, a.port,
        [("/products", {"sku": f"SKU-{i:06d}", "name": f"Product {i}"})
         for i in range(1, a.products + 1)],
        a.threads)]
    hot = c.post("/products", {"sku": "HOT-BOTH", "name": "Hot product, both directions"})["id"]
    oneway = c.post("/products", {"sku": "HOT-ONEWAY", "name": "Hot product, one direction"})["id"]
    wa, wb = warehouses[0], warehouses[1]

    receipts = [("/receipts", {"warehouse_id": w, "product_id": p, "quantity": a.units})
                for p in products for w in warehouses]
    receipts += [
        ("/receipts", {"warehouse_id": wa, "product_id": hot, "quantity": HOT_UNITS}),
        ("/receipts", {"warehouse_id": wb, "product_id": hot, "quantity": HOT_UNITS}),
        ("/receipts", {"warehouse_id": wa, "product_id": oneway, "quantity": ONEWAY_UNITS}),
        ("/receipts", {"warehouse_id": wb, "product_id": oneway, "quantity": HOT_UNITS}),
    ]
    run_parallel(a.host, a.port, receipts, a.threads)
    elapsed = time.monotonic() - t0

    products.sort()
    warehouses_sorted = sorted(warehouses)
    ids = {
        "warehouses": warehouses_sorted,
        "products": products,
        "products_contiguous": products == list(range(products[0], products[0] + len(products))),
        "warehouses_contiguous": warehouses_sorted == list(
            range(warehouses_sorted[0], warehouses_sorted[0] + len(warehouses_sorted))),
        "hot": {"product": hot, "a": wa, "b": wb, "total": 2 * HOT_UNITS},
        "oneway": {"product": oneway, "a": wa, "b": wb, "total": ONEWAY_UNITS + HOT_UNITS},
        "units_per_receipt": a.units,
    }
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "ids.json"), "w") as f:
        json.dump(ids, f)

    def lua_list(xs):
        return "{" + ",".join(str(x) for x in xs) + "}"

    with open(os.path.join(a.out_dir, "ids.lua"), "w") as f:
        f.write("return {\n")
        f.write(f"  warehouses = {lua_list(warehouses_sorted)},\n")
        f.write(f"  products = {lua_list(products)},\n")
        f.write(f"  hot = {{ product = {hot}, a = {wa}, b = {wb} }},\n")
        f.write(f"  oneway = {{ product = {oneway}, a = {wa}, b = {wb} }},\n")
        f.write("}\n")

    print(json.dumps({
        "warehouses": len(warehouses), "products": len(products) + 2,
        "receipts": len(receipts), "seconds": round(elapsed, 1),
        "requests_per_s": round((len(warehouses) + len(products) + 2 + len(receipts)) / elapsed, 1),
    }))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001
        print(f"seed: {e}", file=sys.stderr)
        sys.exit(1)
