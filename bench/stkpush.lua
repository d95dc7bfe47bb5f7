-- wrk script: POST /stkpush with a distinct phone per request (so the per-phone lock never
-- interferes), bearer key from BENCH_API_KEY. BENCH_PHONE_BASE differs per wrk run, so a
-- warm-up and the measured run never reuse a phone.
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  n = 0
  key = os.getenv("BENCH_API_KEY")
  base = tonumber(os.getenv("BENCH_PHONE_BASE") or "0")
end

function request()
  n = n + 1
  local phone = string.format("07%08d", (base + tid * 5000000 + n) % 100000000)
  local body = string.format('{"phone":"%s","amount":10,"reference":"BENCH"}', phone)
  return wrk.format("POST", "/stkpush", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. key,
  }, body)
end
