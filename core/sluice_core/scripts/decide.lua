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
-- A "resolve" decision (an API key whose grant the sidecar has not cached; keys resolved from
-- Redis grants, sluice_core.grants) is marked by "r" in place of n:
--   KEYS:  the grant key (sluice_core.keyschema.grant_key), its m rule buckets, then f fallback
--          buckets (the anonymous client's, for an unknown key; only where one call can take
--          them with the grant: any key on one node, the grant's slot on a Cluster)
--   ARGV:  "r", cost, m, m x (EM, CAP), f, f x (EM, CAP), the policy tag (sluice_core.grants
--          .policy_tag: 128 bits of the policy ref's SHA-256), t, t x (tier name, bucket suffix,
--          EM, CAP): the policy's tiers
--   Reply: the grant value ("" for an unknown key: none, expired, unreadable, written for
--          another policy (its tag differs: a policy id collision), or naming a tier the policy
--          no longer has), then as above over the buckets decided: the key's tier
--          bucket (or its own-limit bucket, "<tag>:t:<tier>:<limit tag>", EM = ceil(period /
--          requests), CAP = burst * EM) and its rule buckets; for an unknown key the fallback
--          buckets (nothing more when f = 0). An unknown key writes nothing.
--   The key's tier bucket is not in KEYS: it shares the grant's hash tag, so it lives in the
--   same slot (an undeclared same-slot key works on Redis Cluster; tested).
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

-- One decision over n buckets: keys bk[ko .. ko+n-1], (EM, CAP) as bp[po], bp[po+1], ... Hot
-- path: no tables and no string formatting (numbers passed to redis.call are converted with 17
-- significant digits, exact for these integers).
local function judge(bk, ko, bp, po, n, cost)
  local allowed = 1
  for i = 0, n - 1 do
    local cur = tat[bk[ko + i]]
    if cur < now then cur = now end
    if cost > 0 and cur + cost * tonumber(bp[po + 2 * i]) - now > tonumber(bp[po + 2 * i + 1]) then
      allowed = 0
    end
  end
  no = no + 1
  out[no] = allowed
  for i = 0, n - 1 do
    local key = bk[ko + i]
    local cur = tat[key]
    if cur < now then cur = now end
    no = no + 1
    if allowed == 1 then
      local new = cur + cost * tonumber(bp[po + 2 * i])
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
end

-- A grant's number field: 1 to 15 ASCII digits (below 2^53), as sluice_core.grants.decode reads
-- it; nil otherwise (tonumber alone would take "0x10", "1e3", " 5").
local function digits(s)
  if #s > 15 or not string.find(s, '^%d+$') then return nil end
  return tonumber(s)
end

-- The bucket a stored grant names (key, EM, CAP), or nil for an unknown key. Tiers are ARGV
-- [tp .. tp + 4t - 1]: name, suffix, EM, CAP each; ptag the policy's tag.
local function grant_bucket(gkey, value, ptag, tp, t)
  if not value then return nil end
  local tier, req, per, burst, ltag, exp, gtag = string.match(value,
    '^2|([^|]+)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|')
  if not tier or gtag ~= ptag then return nil end
  local expires = digits(exp)
  if not expires then return nil end
  if expires ~= 0 and expires * 1000 <= now then return nil end  -- Redis drops it then, too
  for i = 0, t - 1 do
    local at = tp + 4 * i
    if ARGV[at] == tier then
      local tag = string.sub(gkey, 1, -3)  -- the grant key less ":g": the client's hash tag
      if req == '' then  -- no own limit: all four fields empty
        if per ~= '' or burst ~= '' or ltag ~= '' then return nil end
        return tag .. ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
      end
      local r, p, b = digits(req), digits(per), digits(burst)
      if not (r and p and b) or r < 1 or p < 1 or b < 1 then return nil end
      local em = math.floor(p / r)   -- ceil(p / r), exactly (products stay below 2^53)
      while em * r < p do em = em + 1 end
      while em > 1 and (em - 1) * r >= p do em = em - 1 end
      return tag .. ':t:' .. tier .. ':' .. ltag, em, b * em
    end
  end
  return nil  -- a tier the policy no longer has: not a key of this policy
end

local a, k = 2, 1             -- ARGV and KEYS cursors
for _ = 1, tonumber(ARGV[1]) do
  if ARGV[a] == 'r' then
    local cost, m = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local rp = a + 3
    local f = tonumber(ARGV[rp + 2 * m])
    local fp = rp + 2 * m + 1
    local ptag = ARGV[fp + 2 * f]
    local t = tonumber(ARGV[fp + 2 * f + 1])
    local tp = fp + 2 * f + 2
    local gkey = KEYS[k]
    local bkey, em, cap = grant_bucket(gkey, stored[k], ptag, tp, t)
    no = no + 1
    if bkey then
      out[no] = stored[k]
      if tat[bkey] == nil then tat[bkey] = tonumber(redis.call('GET', bkey)) or 0 end
      local bk, bp = {bkey}, {em, cap}
      for i = 1, m do
        bk[i + 1] = KEYS[k + i]
        bp[2 * i + 1] = ARGV[rp + 2 * (i - 1)]
        bp[2 * i + 2] = ARGV[rp + 2 * (i - 1) + 1]
      end
      judge(bk, 1, bp, 1, m + 1, cost)
    else
      out[no] = ''
      if f > 0 then judge(KEYS, k + 1 + m, ARGV, fp, f, cost) end
    end
    k = k + 1 + m + f
    a = tp + 4 * t
  else
    local n = tonumber(ARGV[a])
    judge(KEYS, k, ARGV, a + 2, n, tonumber(ARGV[a + 1]))
    k = k + n
    a = a + 2 + 2 * n
  end
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
