-- Create a config document where there is none, never replacing one: the placeholder that
-- says "Redis holds Sluice's config and this document adds no policy". Safe from any writer at
-- any time (operator replicas, `sluice apply`): a real document, or one written meanwhile, stays.
-- KEYS[1]: the config hash; ARGV[1]: the placeholder document; ARGV[2]: minimum version (as in
--          publish_config.lua, so versions keep rising after Redis lost the hash);
-- ARGV[3]: change-notice channel; ARGV[4]: namespace
-- Returns the new version, or 0 when a document was there already.
if redis.call('HEXISTS', KEYS[1], 'doc') == 1 then
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
