-- W3o: hot rows, one direction only: a dedicated product seeded with enough stock at the source
-- for the whole run.
dofile(os.getenv("BENCH_LIB") .. "/wrk/common.lua")

local o = ids.oneway
local body = transfer_body(o.product, o.a, o.b)

function request()
  return wrk.format("POST", "/transfers", json_headers, body)
end
