-- Delete the consumers of a group that are gone for good: nothing pending and idle longer than
-- a bound, never the caller's own. Every restart of a collector pod joins the group under a new
-- name (the pod's), and XGROUP never forgets a consumer by itself. One script, so no entry is
-- delivered to a consumer between the look and its deletion (XGROUP DELCONSUMER would drop its
-- pending entries from the group: never acknowledged, never delivered again).
-- KEYS[1]: the usage stream. ARGV[1]: the group; ARGV[2]: idle milliseconds; ARGV[3]: the
-- caller's consumer name. Returns the names deleted (none without the stream or the group).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers['err'] then  -- NOGROUP: the collector creates it again on its next read
  return {}
end
local idle_ms = tonumber(ARGV[2])
local gone = {}
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do
    info[c[i]] = c[i + 1]
  end
  if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0 and tonumber(info['idle']) > idle_ms then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    gone[#gone + 1] = info['name']
  end
end
return gone
