-- wrk script: one ledger.deposit per request, each under a new Idempotency-Key.
--
-- Arguments after `--`: a key prefix unique to the run, the number of
-- accounts (acct-0 .. acct-N-1, opened beforehand) and the request path.
-- A key is PREFIX-THREAD-COUNTER, so no two requests of a run share one.
-- done() prints one line starting with WRK_RESULT and a JSON object.

local thread_count = 0

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

local counter = 0
local prefix = "run"
local accounts = 1000
local path = "/commands"

function init(args)
  prefix = args[1] or prefix
  accounts = tonumber(args[2] or accounts)
  path = args[3] or path
end

function request()
  counter = counter + 1
  local key = prefix .. "-" .. thread_index .. "-" .. counter
  local body = '{"type":"ledger.deposit","payload":{"account":"acct-'
    .. (counter % accounts) .. '","amount":100}}'
  local headers = {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = key,
  }
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"status_errors":%d,'
      .. '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max))
end
