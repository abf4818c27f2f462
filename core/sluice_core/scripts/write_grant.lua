-- Write or remove one API key's grant and announce it, in one call (a Redis Cluster client
-- cannot pipeline PUBLISH; the notice must not go out without the write, nor the reverse).
-- KEYS[1]: the grant key (sluice_core.keyschema.grant_key)
-- ARGV[1]: the encoded grant (sluice_core.grants), or "" to remove it
-- ARGV[2]: expiry, unix ms ("0": none); ARGV[3]: the change-notice channel; ARGV[4]: the notice
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
elseif ARGV[2] ~= '0' then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
