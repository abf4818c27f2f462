-- Remove a namespace's config hash if it still holds the given document: the namespace is
-- gone and its document is the empty one its last policy left. A document written since (the
-- namespace re-created under the same name, a new policy) stays.
-- KEYS[1]: the namespace's config hash; ARGV[1]: the document expected there
-- Returns 1 when the hash was removed, else 0.
if redis.call('HGET', KEYS[1], 'doc') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
