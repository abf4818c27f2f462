-- Announce which of a policy's API-key grants a bulk write or revocation changed.
-- A script rather than a plain PUBLISH so that a Redis Cluster client sends it to the node of
-- KEYS[1], the policy's grant index: every bulk notice of a policy leaves from one node, in the
-- order it was sent (a plain PUBLISH goes to any node, and notices sent from different nodes
-- may overtake each other on their way to a subscriber).
-- KEYS[1]: the policy's grant index (keyschema.grant_index_key; only routes the call)
-- ARGV[1]: the change-notice channel; ARGV[2..]: the notices ("<policy id> <client>" each, or
--          one "<policy id> *")
for i = 2, #ARGV do
  redis.call('PUBLISH', ARGV[1], ARGV[i])
end
return #ARGV - 1
