-- wrk script for the payments, capacity and rush workloads: POST /stkpush with a distinct
-- phone per request (never two clients on one phone: the phone lock would answer 409), by
-- clients that honour `503 gateway_busy` + `Retry-After: 1` (the thread's next request
-- waits a second), counting every answer by status so the runner can check each was 202
-- or 503. BENCH_API_KEY, BENCH_CLIENTS and BENCH_PHONE_BASE come from bench/run.py.
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  key = os.getenv("BENCH_API_KEY")
  base = tonumber(os.getenv("BENCH_PHONE_BASE") or "0")
  clients = tonumber(os.getenv("BENCH_CLIENTS") or "1")
  s202, s503, other, wait = 0, 0, 0, 0
end

function request()
  n = n + 1
  -- interleaved by thread: no two clients ever use one phone (the phone lock would say 409)
  local phone = string.format("07%08d", (base + n * clients + tid) % 100000000)
  local body = string.format('{"phone":"%s","amount":10,"reference":"RUSH"}', phone)
  return wrk.format("POST", "/stkpush", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. key,
  }, body)
end

function response(status, headers, body)
  if status == 202 then
    s202 = s202 + 1
  elseif status == 503 then
    s503 = s503 + 1
    wait = 1000 * tonumber(headers["Retry-After"] or "1")
  else
    other = other + 1
  end
end

function delay()
  local d = wait
  wait = 0
  return d
end

function done(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("s202")
    b = b + t:get("s503")
    c = c + t:get("other")
  end
  io.write(string.format("rush status 202=%d 503=%d other=%d\n", a, b, c))
end
