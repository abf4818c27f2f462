-- One page of a re-apply's revocations (sluice_core.keysapply): of these index entries, those the
-- run's keys file does not list and nobody wrote one at a time during the run. In one call with
-- the checks that make the answer safe to act on: the run still holds the lease, and its staging
-- set is still there (a lost set would make every key look unlisted: a mass revocation).
-- KEYS[1]: the lease; KEYS[2]: the staging set; KEYS[3]: the touched set (apply_lease.lua)
-- ARGV[1]: the run id; ARGV[2]: the lease's length, ms (renewed); ARGV[3..]: client ids
-- Returns {1, unlisted ids...}, {0, holder, ms left} (lease lost) or {-1} (staging set gone).
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if holder then return {0, holder, redis.call('PTTL', KEYS[1])} end
  return {0, '', 0}
end
if redis.call('SISMEMBER', KEYS[2], '!' .. ARGV[1]) == 0 then return {-1} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local out = {1}
if #ARGV < 3 then return out end
local ids = {unpack(ARGV, 3)}
local listed = redis.call('SMISMEMBER', KEYS[2], unpack(ids))
local touched = redis.call('SMISMEMBER', KEYS[3], unpack(ids))
for i, id in ipairs(ids) do
  if listed[i] == 0 and touched[i] == 0 then out[#out + 1] = id end
end
return out
