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
-- Reply: per decision, concatenated: allowed (1/0), retry_us, then per bucket:
--        remaining, next_token_us, full_us
--   allowed        1 when every bucket had room; a refused decision takes nothing
--   retry_us       when refused: wait until the same request could pass (0 when allowed)
--   remaining      whole tokens left (after this request when allowed; when refused, what
--                  every bucket holds now, as nothing was taken)
--   next_token_us  until the bucket holds one more whole token (0 when full)
--   full_us        until the bucket is full again
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
  local allowed, retry = 1, 0
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
    local over = new - now - tonumber(ARGV[a + 2 * i + 1])
    if over > 0 then
      allowed = 0
      if over > retry then retry = over end
    end
    olds[i], news[i] = cur, new
  end
  out[#out + 1] = allowed
  out[#out + 1] = retry
  for i = 0, n - 1 do
    local em = tonumber(ARGV[a + 2 * i])
    local debt = olds[i] - now
    if allowed == 1 then debt = news[i] - now end
    local room = tonumber(ARGV[a + 2 * i + 1]) - debt
    local nxt = 0
    if debt > 0 then nxt = em - room % em end
    out[#out + 1] = math.max(0, math.floor(room / em))
    out[#out + 1] = nxt
    out[#out + 1] = debt
    if allowed == 1 and cost > 0 then
      local key = KEYS[k + i]
      if not queued[key] then
        queued[key] = true
        order[#order + 1] = key
      end
      tat[key] = news[i]
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
