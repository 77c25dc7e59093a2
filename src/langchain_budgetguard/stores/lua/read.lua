-- Read counters of one hash tag after reaping expired holds.
-- KEYS: (counter, lease set) per counter. ARGV: retry_ms.
-- Returns {spent1, held1, sliced1, spent2, ...}: held counts holds and slices, sliced the slices.
local keep = check_ms(ARGV[1], 'retry_ms')
local now = now_ms()
local out = {}
for i = 1, #KEYS / 2 do
  local c, l = KEYS[2 * i - 1], KEYS[2 * i]
  reap(c, l, now, keep)
  local state = redis.call('HMGET', c, 's', 'h', 'g')
  out[3 * i - 2] = state[1] or '0'
  out[3 * i - 1] = held_of(state[2], state[3])
  out[3 * i] = state[3] or '0'
end
return out
