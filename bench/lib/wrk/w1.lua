-- W1: GET /products/{random catalog product}
dofile(os.getenv("BENCH_LIB") .. "/wrk/common.lua")

function request()
  local p = ids.products[math.random(#ids.products)]
  return wrk.format("GET", "/products/" .. p)
end
