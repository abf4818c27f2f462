-- One API key's entry in its policy's index, where the grant itself is in another slot (a Redis
-- Cluster: configstore._write_grant calls this before a write, after a removal), and, while a
-- `sluice apply` run holds the policy's lease, in the run's touched set: the run keeps the key.
-- KEYS[1]: the index; KEYS[2]: the lease; KEYS[3]: the touched set (keyschema; one slot)
-- ARGV[1]: "add" or "rem"; ARGV[2]: the key's client id
if ARGV[1] == 'add' then
  redis.call('SADD', KEYS[1], ARGV[2])
else
  redis.call('SREM', KEYS[1], ARGV[2])
end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('SADD', KEYS[3], ARGV[2]) end
return 1
