-- Reserve ARGV amount on every counter of one hash tag, or on none.
-- KEYS: call record, then (counter, lease set, spend index) per counter.
-- ARGV: call_id, amount, charge_on_expiry, lease_ms, retry_ms, token, then (limit, expires_at
-- or '') per counter, then each counter's member in its spend index ('' for none).
-- Returns {code, index, spent1, held1, spent2, held2, ...}, states as found before this hold:
-- code 1 placed, 2 duplicate (this token's record exists: nothing changed), 3 reused (the call
-- id reserved with another token, settled or was released: refused), 0 refused at index
-- (1-based).
-- The call record is 'h:<token>' while held (lease + retry_ms), 's' once settled, 'r' released.
local record, id, amount, charge = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local n = (#KEYS - 1) / 3
check_nano(amount, 'amount')
check_nano(charge, 'charge_on_expiry')
local lease_ms = check_ms(ARGV[4], 'lease_ms')
local keep = check_ms(ARGV[5], 'retry_ms')
local token = ARGV[6]
if type(token) ~= 'string' or token == '' or string.find(token, ':', 1, true) then
  error('budgetguard: token must be a non-empty string without ":"')
end
for i = 1, n do
  check_nano(ARGV[5 + 2 * i], 'limit')
  local e = ARGV[6 + 2 * i]
  if e ~= '' and not (string.match(e, '^%d+$') and #e <= 12) then
    error('budgetguard: expires_at must be epoch seconds or empty, got ' .. tostring(e))
  end
end
local now = now_ms()
local out = {1, 0}
for i = 1, n do
  local c, l = KEYS[3 * i - 1], KEYS[3 * i]
  reap(c, l, now, keep)
  local state = redis.call('HMGET', c, 's', 'h')
  out[2 * i + 1] = state[1] or '0'
  out[2 * i + 2] = state[2] or '0'
end
local rec = redis.call('GET', record)
if rec then
  out[1] = rec == 'h:' .. token and 2 or 3
  return out
end
for i = 1, n do
  if not fits(out[2 * i + 1], out[2 * i + 2], amount, ARGV[5 + 2 * i]) then
    out[1] = 0
    out[2] = i
    return out
  end
end
local deadline = now + lease_ms
for i = 1, n do
  local c, l = KEYS[3 * i - 1], KEYS[3 * i]
  redis.call('HINCRBY', c, 'h', amount)
  redis.call('HSET', c, '@' .. id, amount .. ':' .. charge)
  redis.call('ZADD', l, deadline, id)
  keep_until(c, l, ARGV[6 + 2 * i], now)
  index_spent(c, KEYS[3 * i + 1], ARGV[6 + 2 * n + i])
end
redis.call('SET', record, 'h:' .. token, 'PX', lease_ms + keep)
return out
