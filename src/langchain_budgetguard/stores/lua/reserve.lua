-- Reserve ARGV amount on every counter of one hash tag, or on none.
-- KEYS: call record, then (counter, lease set) per counter.
-- ARGV: call_id, amount, charge_on_expiry, lease_ms, record_ttl_ms, then (limit, expires_at or '')
-- per counter.
-- Returns {code, index, spent1, held1, spent2, held2, ...}, states as found before this hold:
-- code 1 placed, 2 duplicate (the call record exists: nothing changed), 0 refused at index
-- (1-based).
local record, id, amount, charge = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local lease_ms = tonumber(ARGV[4])
local now = now_ms()
local n = (#KEYS - 1) / 2
local out = {1, 0}
for i = 1, n do
  local c, l = KEYS[2 * i], KEYS[2 * i + 1]
  reap(c, l, now)
  local state = redis.call('HMGET', c, 's', 'h')
  out[2 * i + 1] = state[1] or '0'
  out[2 * i + 2] = state[2] or '0'
end
if redis.call('EXISTS', record) == 1 then
  out[1] = 2
  return out
end
for i = 1, n do
  if not fits(out[2 * i + 1], out[2 * i + 2], amount, ARGV[4 + 2 * i]) then
    out[1] = 0
    out[2] = i
    return out
  end
end
local deadline = now + lease_ms
for i = 1, n do
  local c, l = KEYS[2 * i], KEYS[2 * i + 1]
  redis.call('HINCRBY', c, 'h', amount)
  redis.call('HSET', c, '@' .. id, amount .. ':' .. charge)
  redis.call('ZADD', l, deadline, id)
  keep_until(c, l, ARGV[5 + 2 * i], now)
end
-- The record remembers what expiry charges, so that a late settle can replace it.
redis.call('SET', record, 'h:' .. charge, 'PX', lease_ms + tonumber(ARGV[5]))
return out
