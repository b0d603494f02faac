-- W2: POST /transfers of 1 unit of a random catalog product between two random distinct warehouses
dofile(os.getenv("BENCH_LIB") .. "/wrk/common.lua")

function request()
  local p = ids.products[math.random(#ids.products)]
  local from, to = two_warehouses()
  return wrk.format("POST", "/transfers", json_headers, transfer_body(p, from, to))
end
