-- Zero one counter's spent after reaping expired holds; live holds stay (their calls settle as usual).
-- KEYS: counter hash, lease set. Returns {spent, held} as they were before the reset.
local c, l = KEYS[1], KEYS[2]
reap(c, l, now_ms())
local state = redis.call('HMGET', c, 's', 'h')
if redis.call('EXISTS', c) == 1 then redis.call('HSET', c, 's', '0') end
return {state[1] or '0', state[2] or '0'}
