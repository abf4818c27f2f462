-- Replace the usage summary (sluice_core.usagesummary) in one step: the policies a collector
-- saw no traffic of in the last hour must not keep an older summary, and an operator reading
-- meanwhile sees the old summary or the new one, never a mix. Then its TTL, so that the
-- summary of a collector that stopped goes away on its own.
-- KEYS[1]: the summary hash; ARGV[1]: TTL in ms; ARGV[2..]: field, value, field, value, ...
-- Returns the number of fields written.
redis.call('DEL', KEYS[1])
local n = #ARGV
local i = 2
while i <= n do
  local last = math.min(i + 999, n) -- 500 pairs per HSET: within unpack's stack
  redis.call('HSET', KEYS[1], unpack(ARGV, i, last))
  i = last + 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return (n - 1) / 2
