-- wrk script: POST /commands/batch with ITEMS ledger.deposit items per request.
--
-- Arguments after `--`: a key prefix unique to the run, the number of
-- accounts (opened beforehand), the request path and the items per request.
-- Each item's id is PREFIX-THREAD-N with N counting items, so every id in
-- a run is new. done() prints one line starting with WRK_RESULT and JSON.

local thread_count = 0

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

local counter = 0
local prefix = "run"
local accounts = 1000
local path = "/commands/batch"
local items_per_request = 1000
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  prefix = args[1] or prefix
  accounts = tonumber(args[2] or accounts)
  path = args[3] or path
  items_per_request = tonumber(args[4] or items_per_request)
end

function request()
  local items = {}
  for i = 1, items_per_request do
    counter = counter + 1
    items[i] = '{"id":"' .. prefix .. "-" .. thread_index .. "-" .. counter
      .. '","type":"ledger.deposit","payload":{"account":"acct-'
      .. (counter % accounts) .. '","amount":100}}'
  end
  return wrk.format("POST", path, headers, "[" .. table.concat(items, ",") .. "]")
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
