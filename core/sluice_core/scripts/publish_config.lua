-- Atomically replace a namespace's compiled config and announce it.
-- KEYS[1]: the namespace's config hash (fields: version, doc, updated)
-- ARGV[1]: the JSON document; ARGV[2]: minimum version (so versions keep rising even after
--          Redis lost the hash); ARGV[3]: change-notice channel; ARGV[4]: namespace;
-- ARGV[5]: "missing" to write only where there is no document at all (the placeholder that
--          says "Redis holds Sluice's config and this document adds no policy"): safe from any
--          writer at any time, a real document, or one written meanwhile, stays.
-- Returns the new version, or 0 when ARGV[5] is "missing" and a document was there already.
if ARGV[5] == 'missing' and redis.call('HEXISTS', KEYS[1], 'doc') == 1 then
  return 0
end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
local floor = tonumber(ARGV[2])
if v < floor then
  v = floor
  redis.call('HSET', KEYS[1], 'version', v)
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'updated', t[1])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. v)
return v
