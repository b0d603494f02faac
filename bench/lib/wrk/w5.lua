-- W5: write, then read with the token. POST /receipts (1 unit of a random product into a random
-- warehouse); the product's stock is then read, GET /products/{id}/stock, with the POST's
-- Consistency-Token header (docs/scale-out.md). wrk has no per-connection state in Lua: each thread
-- keeps a queue of (product, token) from its answered receipts, and a connection that is ready to
-- send takes the oldest one for its read, or writes when the queue is empty. So every read carries
-- the token of a write answered moments before, and reads and writes alternate about 1:1.
dofile(os.getenv("BENCH_LIB") .. "/wrk/common.lua")

local count = response
local pending = {}
local first, last = 1, 0

function request()
  if first <= last then
    local r = pending[first]
    pending[first] = nil
    first = first + 1
    local headers = r.token and { ["Consistency-Token"] = r.token } or {}
    return wrk.format("GET", "/products/" .. r.product .. "/stock", headers)
  end
  local p = ids.products[math.random(#ids.products)]
  local w = ids.warehouses[math.random(#ids.warehouses)]
  return wrk.format("POST", "/receipts", json_headers,
    string.format('{"warehouse_id":%d,"product_id":%d,"quantity":1}', w, p))
end

function response(status, headers, body)
  count(status, headers, body)
  if status == 201 then
    local product = string.match(body or "", '"product_id":(%d+)')
    if product then
      last = last + 1
      -- Without a replica the app issues no token: the read is then a plain read.
      pending[last] = { product = product,
                        token = headers["consistency-token"] or headers["Consistency-Token"] }
    end
  end
end
