-- Atomically replace a namespace's compiled config and announce it.
-- KEYS[1]: the namespace's config hash (fields: version, doc, updated)
-- ARGV[1]: the JSON document; ARGV[2]: minimum version (so versions keep rising even after
--          Redis lost the hash); ARGV[3]: change-notice channel; ARGV[4]: namespace
-- Returns the new version.
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
