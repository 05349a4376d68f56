-- wrk script: single ledger.deposit requests, a share of them client retries.
--
-- Arguments after `--`: a key prefix unique to the run, the number of
-- accounts (opened beforehand), the request path, the duplicate share
-- (0 to 1), the RNG seed and the retry window. With probability SHARE a
-- request resends, byte for byte, one of the thread's last WINDOW new
-- requests, picked uniformly: the same Idempotency-Key and the same body.
-- Otherwise it sends a new key PREFIX-THREAD-COUNTER. The first request of
-- a thread is always new.
--
-- Each thread seeds its own generator with SEED + its index, so the k-th
-- request of a thread is the same choice in every run. Which requests
-- complete before the run ends depends on timing.
--
-- done() prints one line starting with WRK_RESULT and a JSON object. Its
-- new_keys counts every new key sent, the ones still in flight at the end
-- too, and duplicates counts the resent requests.

local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

-- Globals, not locals, so that done() can read them with thread:get().
new_keys = 0
duplicates = 0
local prefix = "run"
local accounts = 1000
local path = "/commands"
local share = 0
local window = 1000
local recent = {}

function init(args)
  prefix = args[1] or prefix
  accounts = tonumber(args[2] or accounts)
  path = args[3] or path
  share = tonumber(args[4] or share)
  local seed = tonumber(args[5] or 1)
  window = tonumber(args[6] or window)
  math.randomseed(seed + thread_index)
end

local function deposit(key, index)
  local body = '{"type":"ledger.deposit","payload":{"account":"acct-'
    .. (index % accounts) .. '","amount":100}}'
  local headers = {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = key,
  }
  return wrk.format("POST", path, headers, body)
end

-- wrk 4.1's main() (wrk.c) calls request() once on thread 0 before the run,
-- through script_verify_request(), and never sends that request. It gets its
-- own key and is not counted, so a wrk without that call would show one
-- stored command more than new_keys.
local checked = false

function request()
  if thread_index == 0 and not checked then
    checked = true
    return deposit(prefix .. "-check", 0)
  end
  if new_keys > 0 and math.random() < share then
    duplicates = duplicates + 1
    local in_window = math.min(new_keys, window)
    local age = math.random(in_window) - 1
    return recent[(new_keys - 1 - age) % window]
  end
  local sent = deposit(prefix .. "-" .. thread_index .. "-" .. new_keys, new_keys)
  recent[new_keys % window] = sent
  new_keys = new_keys + 1
  return sent
end

function done(summary, latency, requests)
  local new_total, duplicate_total = 0, 0
  for _, thread in ipairs(threads) do
    new_total = new_total + thread:get("new_keys")
    duplicate_total = duplicate_total + thread:get("duplicates")
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"status_errors":%d,'
      .. '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,'
      .. '"new_keys":%d,"duplicates":%d}\n',
    summary.requests, summary.duration, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max,
    new_total, duplicate_total))
end
