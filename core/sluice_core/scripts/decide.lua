-- Sluice decision script: the buckets of one or more requests, checked and taken atomically.
--
-- Buckets are GCRA (generic cell rate algorithm) token buckets: a bucket's whole state is its
-- "theoretical arrival time" (TAT), an integer in microseconds of Redis's own clock. A bucket
-- with emission interval EM (microseconds per token) and capacity CAP = burst * EM admits a
-- request of COST tokens iff max(TAT, now) + COST * EM - now <= CAP. All numbers are integers
-- below 2^53, so the arithmetic is exact in Lua's doubles (and Redis writes them in full: it
-- converts numbers with 17 significant digits).
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
-- A cost of 0 only reads (admin "peek"). A negative cost gives tokens back (a refund: a request
-- taken by one policy and then refused by another, on Redis Cluster where the two are two calls):
-- always allowed; a bucket it makes full again is deleted, as a missing key is a full bucket.
-- (Its reply is not meant to be read: debts may come out negative.)

local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tat = {}                -- key -> TAT as known in this run (read once, then updated here)
local stored = redis.call('MGET', unpack(KEYS))   -- one call for all reads (fixed cost per call)
for i = 1, #KEYS do tat[KEYS[i]] = tonumber(stored[i]) or 0 end
local order, queued, nw = {}, {}, 0   -- keys to write, once each, in first-write order
local out, no = {}, 0
local a, k = 2, 1             -- ARGV and KEYS cursors
-- Hot path: no tables per decision and no string formatting (numbers passed to redis.call
-- are converted with 17 significant digits, exact for these integers).
for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  local cost = tonumber(ARGV[a + 1])
  a = a + 2
  local allowed = 1
  for i = 0, n - 1 do
    local key = KEYS[k + i]
    local cur = tat[key]
    if cur < now then cur = now end
    if cost > 0 and cur + cost * tonumber(ARGV[a + 2 * i]) - now > tonumber(ARGV[a + 2 * i + 1]) then
      allowed = 0
    end
  end
  no = no + 1
  out[no] = allowed
  for i = 0, n - 1 do
    local key = KEYS[k + i]
    local cur = tat[key]
    if cur < now then cur = now end
    no = no + 1
    if allowed == 1 then
      local new = cur + cost * tonumber(ARGV[a + 2 * i])
      out[no] = new - now
      if cost ~= 0 then
        tat[key] = new
        if not queued[key] then
          queued[key] = true
          nw = nw + 1
          order[nw] = key
        end
      end
    else
      out[no] = cur - now
    end
  end
  k = k + n
  a = a + 2 * n
end
for i = 1, nw do
  local key = order[i]
  local v = tat[key]
  -- The key lives until the bucket is full again (then it equals a missing key), plus 1 s.
  if v > now then
    redis.call('SET', key, v, 'PX', math.floor((v - now) / 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end
return out
