-- Sluice decision script: the buckets of one or more requests, checked and taken atomically.
--
-- Buckets are GCRA (generic cell rate algorithm) token buckets: a bucket's whole state is its
-- "theoretical arrival time" (TAT), an integer in microseconds of Redis's own clock. A bucket
-- with emission interval EM (microseconds per token) and capacity CAP = burst * EM admits a
-- request of COST tokens iff max(TAT, now) + COST * EM - now <= CAP. All numbers are integers
-- below 2^53, so the arithmetic is exact in Lua's doubles.
--
-- One run may carry several decisions (the sidecar batches the requests that arrive in the
-- same event-loop turn, which amortises the script's fixed cost). They are decided in order,
-- each one all-or-nothing over its own buckets, and a later decision sees the tokens taken by
-- an earlier one; every touched key is written once at the end.
--
-- KEYS:  the buckets of decision 1, then those of decision 2, ... (on Redis Cluster all keys of
--        one run share a hash tag: the sidecar only batches decisions of the same slot there)
-- ARGV:  [1] number of decisions D; then per decision: n (its bucket count), cost, and for
--        each of its buckets EM, CAP (integers, microseconds)
-- Reply: per decision, concatenated: allowed (1/0), then per bucket its debt in microseconds
--        (TAT - now: after this request when allowed; when refused, before it, as a refused
--        decision takes nothing). Everything else follows from debt, EM and CAP, which the
--        caller knows, so it is computed there (sluice_core.gcra.expand) rather than here:
--        every reply element costs Redis time to convert.
-- A cost of 0 only reads (admin "peek").

local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tat = {}     -- key -> TAT as known in this run
local order = {}   -- keys to write, in first-write order
local queued = {}  -- key -> true once in order
local out = {}
local a = 2        -- ARGV cursor
local k = 1        -- KEYS cursor
for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  local cost = tonumber(ARGV[a + 1])
  a = a + 2
  local allowed = 1
  local olds, news = {}, {}
  for i = 0, n - 1 do
    local key = KEYS[k + i]
    local cur = tat[key]
    if cur == nil then
      cur = tonumber(redis.call('GET', key)) or 0
      tat[key] = cur
    end
    if cur < now then cur = now end
    local new = cur + cost * tonumber(ARGV[a + 2 * i])
    if new - now > tonumber(ARGV[a + 2 * i + 1]) then allowed = 0 end
    olds[i], news[i] = cur, new
  end
  out[#out + 1] = allowed
  for i = 0, n - 1 do
    if allowed == 1 then
      out[#out + 1] = news[i] - now
      if cost > 0 then
        local key = KEYS[k + i]
        if not queued[key] then
          queued[key] = true
          order[#order + 1] = key
        end
        tat[key] = news[i]
      end
    else
      out[#out + 1] = olds[i] - now
    end
  end
  k = k + n
  a = a + 2 * n
end
for _, key in ipairs(order) do
  -- The key lives until the bucket is full again (then it equals a missing key), plus 1 s.
  redis.call('SET', key, string.format('%.0f', tat[key]),
             'PX', math.floor((tat[key] - now) / 1000) + 1000)
end
return out
