-- Sluice decision script: every bucket of one request, checked and taken in one atomic run.
--
-- Buckets are GCRA (generic cell rate algorithm) token buckets: a bucket's whole state is its
-- "theoretical arrival time" (TAT), an integer in microseconds of Redis's own clock. A bucket
-- with emission interval EM (microseconds per token) and capacity CAP = burst * EM admits a
-- request of COST tokens iff max(TAT, now) + COST * EM - now <= CAP. All numbers are integers
-- below 2^53, so the arithmetic is exact in Lua's doubles.
--
-- KEYS:  the request's bucket keys (same hash tag, so one Cluster slot)
-- ARGV:  [1] cost; then for bucket i: [2i] EM, [2i+1] CAP (integers, microseconds)
-- Reply: {allowed (1/0), retry_us, then per bucket: remaining, next_token_us, full_us}
--   allowed        1 when every bucket had room; nothing is written unless all did
--   retry_us       when refused: wait until the request could pass (0 when allowed)
--   remaining      whole tokens left (after this request when allowed; when refused, what
--                  every bucket holds now, as nothing was taken)
--   next_token_us  until the bucket holds one more whole token (0 when full)
--   full_us        until the bucket is full again
-- A cost of 0 only reads (admin "peek"); nothing is written.

local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local cost = tonumber(ARGV[1])
local n = #KEYS
local stored = redis.call('MGET', unpack(KEYS))
local tats, news = {}, {}
local allowed = 1
local retry = 0
for i = 1, n do
  local tat = tonumber(stored[i]) or now
  if tat < now then tat = now end
  local new = tat + cost * tonumber(ARGV[2 * i])
  local over = new - now - tonumber(ARGV[2 * i + 1])
  if over > 0 then
    allowed = 0
    if over > retry then retry = over end
  end
  tats[i], news[i] = tat, new
end
local out = {allowed, retry}
for i = 1, n do
  local em = tonumber(ARGV[2 * i])
  local debt = tats[i] - now
  if allowed == 1 then debt = news[i] - now end
  local room = tonumber(ARGV[2 * i + 1]) - debt
  local nxt = 0
  if debt > 0 then nxt = em - room % em end
  out[3 * i] = math.max(0, math.floor(room / em))
  out[3 * i + 1] = nxt
  out[3 * i + 2] = debt
end
if allowed == 1 and cost > 0 then
  for i = 1, n do
    -- The key lives until the bucket is full again (then it equals a missing key), plus 1 s.
    redis.call('SET', KEYS[i], string.format('%.0f', news[i]),
               'PX', math.floor((news[i] - now) / 1000) + 1000)
  end
end
return out
