-- Shared by every workload script: ids from the seeder, per-thread status counters, and a
-- done() that prints one JSON line ("BENCH_JSON {...}") summing the counters of all threads.
-- The workload script defines request() after loading this file.

local ids_file = os.getenv("BENCH_IDS") or error("BENCH_IDS is not set")
ids = dofile(ids_file)           -- { products = {...}, warehouses = {...}, hot = {...}, oneway = {...} }

local threads = {}
local counters = { "n", "c2xx", "c3xx", "c4xx", "c404", "c409", "c422", "c5xx", "c500", "c503", "cother" }

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  -- Each thread gets its own random sequence.
  math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919)
  for _, k in ipairs(counters) do _G[k] = 0 end
  first_error = ""
end

function response(status, headers, body)
  n = n + 1
  if status >= 300 and first_error == "" then
    first_error = status .. " " .. string.sub(body or "", 1, 300)
  end
  if status >= 200 and status < 300 then c2xx = c2xx + 1
  elseif status < 400 then c3xx = c3xx + 1
  elseif status < 500 then
    c4xx = c4xx + 1
    if status == 404 then c404 = c404 + 1
    elseif status == 409 then c409 = c409 + 1
    elseif status == 422 then c422 = c422 + 1 end
  elseif status < 600 then
    c5xx = c5xx + 1
    if status == 500 then c500 = c500 + 1
    elseif status == 503 then c503 = c503 + 1 end
  else cother = cother + 1 end
end

-- Two distinct random warehouses.
function two_warehouses()
  local w = ids.warehouses
  local i = math.random(#w)
  local j = math.random(#w - 1)
  if j >= i then j = j + 1 end
  return w[i], w[j]
end

function transfer_body(product, from, to)
  return string.format(
    '{"product_id":%d,"from_warehouse_id":%d,"to_warehouse_id":%d,"quantity":1}',
    product, from, to)
end

json_headers = { ["Content-Type"] = "application/json" }

function done(summary, latency, requests)
  local total = {}
  local sample = ""
  for _, k in ipairs(counters) do total[k] = 0 end
  for _, t in ipairs(threads) do
    for _, k in ipairs(counters) do total[k] = total[k] + (t:get(k) or 0) end
    if sample == "" then sample = t:get("first_error") or "" end
  end
  local e = summary.errors
  local secs = summary.duration / 1e6
  local parts = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_s":%.3f', secs),
    string.format('"rps":%.1f', summary.requests / secs),
    string.format('"ok_rps":%.1f', total.c2xx / secs),
    string.format('"bytes":%d', summary.bytes),
    string.format('"latency_ms":{"mean":%.3f,"stdev":%.3f,"max":%.3f,"p50":%.3f,"p90":%.3f,"p99":%.3f,"p999":%.3f}',
      latency.mean / 1e3, latency.stdev / 1e3, latency.max / 1e3,
      latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
      latency:percentile(99) / 1e3, latency:percentile(99.9) / 1e3),
    string.format('"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.timeout),
  }
  local st = {}
  for _, k in ipairs(counters) do table.insert(st, string.format('"%s":%d', k, total[k])) end
  table.insert(parts, '"status":{' .. table.concat(st, ",") .. '}')
  table.insert(parts, string.format('"non_2xx":%d', total.n - total.c2xx))
  table.insert(parts, string.format('"first_error":"%s"',
    sample:gsub('[%c"\\]', function(c) return c == '"' and '\\"' or (c == '\\' and '\\\\' or ' ') end)))
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
