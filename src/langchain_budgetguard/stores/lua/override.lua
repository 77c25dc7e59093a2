-- Set or clear one live limit override and give the budget's overrides a new version.
-- KEYS: the budget's override hash. ARGV: field, nano-USD ('' clears the field).
-- Returns the new version: a count of changes and the server time of this one. The time makes it
-- new even if the hash lost writes (a restore, a failover to a lagging replica, a DEL), when the
-- count alone would come back to a number a process already read with other values.
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local n = redis.call('HINCRBY', KEYS[1], '#n', 1)
local t = redis.call('TIME')
local v = n .. '@' .. t[1] .. '.' .. t[2]
redis.call('HSET', KEYS[1], '#v', v)
return v
