-- Trim the usage stream to what some consumer group still needs: XACK never deletes an entry,
-- so without this the stream holds its MAXLEN whether the collector read it or not.
-- For each group, the first entry it still needs is the smallest of: its oldest pending entry
-- (delivered to any of its consumers, a dead replica's included, and not acknowledged) and the
-- entry after its last-delivered-id (not yet delivered). Everything older than the smallest of
-- those over every group was acknowledged by every group: XTRIM MINID removes exactly that.
-- One script, so no entry is delivered or acknowledged between the look and the trim.
-- A stream without groups is left alone (only MAXLEN bounds it).
-- KEYS[1]: the usage stream. Returns the number of entries removed.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq), ms}
end
local function less(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local keep = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do
    info[g[i]] = g[i + 1]
  end
  local first = parse(info['last-delivered-id'])
  first[2] = first[2] + 1
  if tonumber(info['pending']) > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], info['name'])[2]
    if oldest then
      local p = parse(oldest)
      if less(p, first) then
        first = p
      end
    end
  end
  if keep == nil or less(first, keep) then
    keep = first
  end
end
if keep == nil then
  return 0
end
return redis.call('XTRIM', KEYS[1], 'MINID', keep[3] .. '-' .. string.format('%d', keep[2]))
