-- Read counters of one hash tag after reaping expired holds.
-- KEYS: (counter, lease set) per counter. Returns {spent1, held1, spent2, held2, ...}.
local now = now_ms()
local out = {}
for i = 1, #KEYS / 2 do
  local c, l = KEYS[2 * i - 1], KEYS[2 * i]
  reap(c, l, now)
  local state = redis.call('HMGET', c, 's', 'h')
  out[2 * i - 1] = state[1] or '0'
  out[2 * i] = state[2] or '0'
end
return out
