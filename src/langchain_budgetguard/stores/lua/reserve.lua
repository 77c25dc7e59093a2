-- Reserve each counter's amount on every counter of one hash tag, or on none.
-- KEYS: call record, then (counter, lease set, spend index) per counter.
-- ARGV: call_id, lease_ms, retry_ms, token, then (limit, expires_at or '', amount,
-- charge_on_expiry, alerts) per counter (alerts: 'a1,a2,...' stored on the counter, '' keeps
-- what is stored), then each counter's member in its spend index ('' for none).
-- Returns {code, index, spent1, held1, spent2, held2, ... (held: holds and slices), then (i, threshold, spent) per alert
-- that expiry charges reaped here fired}, states as found before this hold:
-- code 1 placed, 2 duplicate (this token's record exists: nothing changed), 3 reused (the call
-- id reserved with another token, settled or was released: refused), 0 refused at index
-- (1-based).
-- The call record is 'h:<token>' while held (lease + retry_ms), 's' once settled, 'r' released.
local record, id = KEYS[1], ARGV[1]
local n = (#KEYS - 1) / 3
local lease_ms = check_ms(ARGV[2], 'lease_ms')
local keep = check_ms(ARGV[3], 'retry_ms')
local token = ARGV[4]
if type(token) ~= 'string' or token == '' or string.find(token, ':', 1, true) then
  error('budgetguard: token must be a non-empty string without ":"')
end
-- Counter i's arguments start at ARGV[base(i)]: limit, expires_at, amount, charge, alerts.
local function base(i) return 5 * i end
for i = 1, n do
  local b = base(i)
  check_nano(ARGV[b], 'limit')
  local e = ARGV[b + 1]
  if e ~= '' and not (string.match(e, '^%d+$') and #e <= 12) then
    error('budgetguard: expires_at must be epoch seconds or empty, got ' .. tostring(e))
  end
  check_nano(ARGV[b + 2], 'amount')
  check_nano(ARGV[b + 3], 'charge_on_expiry')
  check_alerts(ARGV[b + 4])
end
local now = now_ms()
local out, fired = {1, 0}, {}
for i = 1, n do
  local c, l = KEYS[3 * i - 1], KEYS[3 * i]
  reap(c, l, now, keep)
  fire_alerts(c, i, fired)
  local state = redis.call('HMGET', c, 's', 'h', 'g')
  out[2 * i + 1] = state[1] or '0'
  out[2 * i + 2] = held_of(state[2], state[3])
end
local function reply()
  for _, v in ipairs(fired) do out[#out + 1] = v end
  return out
end
local rec = redis.call('GET', record)
if rec then
  out[1] = rec == 'h:' .. token and 2 or 3
  return reply()
end
for i = 1, n do
  if not fits(out[2 * i + 1], out[2 * i + 2], ARGV[base(i) + 2], ARGV[base(i)]) then
    out[1] = 0
    out[2] = i
    return reply()
  end
end
local deadline = now + lease_ms
for i = 1, n do
  local c, l, b = KEYS[3 * i - 1], KEYS[3 * i], base(i)
  redis.call('HINCRBY', c, 'h', ARGV[b + 2])
  redis.call('HSET', c, '@' .. id, ARGV[b + 2] .. ':' .. ARGV[b + 3])
  redis.call('ZADD', l, deadline, id)
  local alerts = ARGV[b + 4]
  if alerts ~= '' and redis.call('HGET', c, 'a') ~= alerts then redis.call('HSET', c, 'a', alerts) end
  keep_until(c, l, ARGV[b + 1], now)
  index_spent(c, KEYS[3 * i + 1], ARGV[5 * n + 4 + i])
end
redis.call('SET', record, 'h:' .. token, 'PX', lease_ms + keep)
return reply()
