-- Set or clear one live limit override and bump the budget's override version.
-- KEYS: the budget's override hash. ARGV: field, nano-USD ('' clears the field).
-- Returns the new version.
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return redis.call('HINCRBY', KEYS[1], '#v', 1)
