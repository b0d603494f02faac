-- W3: hot rows. One product, the same two warehouses, random direction per request.
dofile(os.getenv("BENCH_LIB") .. "/wrk/common.lua")

local h = ids.hot
local there = transfer_body(h.product, h.a, h.b)
local back = transfer_body(h.product, h.b, h.a)

function request()
  return wrk.format("POST", "/transfers", json_headers, math.random(2) == 1 and there or back)
end
