-- Write or remove one API key's grant and announce it, in one call (a Redis Cluster client
-- cannot pipeline PUBLISH; the notice must not go out without the write, nor the reverse).
-- The grant has no TTL: an eviction policy that takes keys with a TTL (volatile-*) must not
-- take a grant. Its value carries the expiry; the decision script refuses an expired grant,
-- and `sluice apply` prunes them.
-- KEYS[1]: the grant key (sluice_core.keyschema.grant_key)
-- KEYS[2..4]: optional, the policy's grant index, apply lease and touched set (keyschema),
--          passed where one call may take them all (single Redis, Sentinel); on a Cluster they
--          are in another slot and the caller updates them itself (note_grant.lua): before a
--          write, after a removal.
-- ARGV[1]: the encoded grant (sluice_core.grants), or "" to remove it
-- ARGV[2]: the change-notice channel; ARGV[3]: the notice
-- ARGV[4]: the key's client id, its member in the index (with KEYS[2])
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
  if KEYS[2] then redis.call('SREM', KEYS[2], ARGV[4]) end
else
  if KEYS[2] then redis.call('SADD', KEYS[2], ARGV[4]) end
  redis.call('SET', KEYS[1], ARGV[1])
end
-- A `sluice apply` run of the policy is under way: it must keep this key (keysapply).
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then redis.call('SADD', KEYS[4], ARGV[4]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
