-- The lease of the one `sluice apply` run that may write a policy's keys (sluice_core.keysapply).
-- KEYS[1]: the lease (keyschema.grant_lease_key); KEYS[2]: the run's staging set
-- (grant_staging_key); KEYS[3]: the keys written one at a time during the lease
-- (grant_touched_key). All three in the slot of the policy's index.
-- ARGV[1]: the run id; ARGV[2]: the lease's length, ms; ARGV[3]: "acquire", "renew" or "release".
-- Returns {1} when done, {0, holder, ms left} when another run holds the lease (or none does,
-- holder ""), {-1} when the lease is this run's but its staging set is gone.
local holder = redis.call('GET', KEYS[1])
if ARGV[3] == 'acquire' then
  if holder then return {0, holder, redis.call('PTTL', KEYS[1])} end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  -- Whatever a run that died left (its lease expired), swept; the marker creates the set at
  -- once, so a single write during the lease can tell the run is there.
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('SADD', KEYS[2], '!' .. ARGV[1])
  return {1}
end
if holder ~= ARGV[1] then
  if holder then return {0, holder, redis.call('PTTL', KEYS[1])} end
  return {0, '', 0}
end
if ARGV[3] == 'release' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return {1}
end
if redis.call('SISMEMBER', KEYS[2], '!' .. ARGV[1]) == 0 then return {-1} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1}
