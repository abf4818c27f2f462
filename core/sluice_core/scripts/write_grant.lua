-- Write or remove one API key's grant and announce it, in one call (a Redis Cluster client
-- cannot pipeline PUBLISH; the notice must not go out without the write, nor the reverse).
-- KEYS[1]: the grant key (sluice_core.keyschema.grant_key)
-- KEYS[2]: optional, the policy's grant index (keyschema.grant_index_key), passed where one
--          call may take both keys (single Redis, Sentinel); on a Cluster they are in different
--          slots and the caller updates the index itself: before a write, after a removal.
-- ARGV[1]: the encoded grant (sluice_core.grants), or "" to remove it
-- ARGV[2]: expiry, unix ms ("0": none); ARGV[3]: the change-notice channel; ARGV[4]: the notice
-- ARGV[5]: the key's client id, its member in the index (with KEYS[2])
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
  if KEYS[2] then redis.call('SREM', KEYS[2], ARGV[5]) end
else
  if KEYS[2] then redis.call('SADD', KEYS[2], ARGV[5]) end
  if ARGV[2] ~= '0' then
    redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[1])
  end
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
