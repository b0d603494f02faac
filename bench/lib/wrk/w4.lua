-- W4: GET /health/ready (a SELECT 1 through the pool, outside any transaction)
dofile(os.getenv("BENCH_LIB") .. "/wrk/common.lua")

local req   -- built on first use: wrk sets the Host header (with the port) only in init

function request()
  req = req or wrk.format("GET", "/health/ready")
  return req
end
