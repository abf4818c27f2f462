-- Remove a namespace's config (its last policy was deleted) and announce it.
-- KEYS[1]: the config hash; ARGV[1]: channel; ARGV[2]: namespace
local existed = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' 0')
return existed
