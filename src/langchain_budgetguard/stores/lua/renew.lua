-- Extend call_id's lease on every counter of one hash tag where its hold is still live.
-- KEYS: call record, then (counter, lease set) per counter. ARGV: call_id, lease_ms, retry_ms.
-- Returns 1 when some hold was renewed, 0 when none was live (expired, settled or unknown).
local record, id = KEYS[1], ARGV[1]
local lease_ms = check_ms(ARGV[2], 'lease_ms')
local keep = check_ms(ARGV[3], 'retry_ms')
local now = now_ms()
local renewed = 0
for i = 1, (#KEYS - 1) / 2 do
  local c, l = KEYS[2 * i], KEYS[2 * i + 1]
  reap(c, l, now, keep)
  if redis.call('HEXISTS', c, '@' .. id) == 1 then
    redis.call('ZADD', l, now + lease_ms, id)
    renewed = 1
  end
end
if renewed == 1 then redis.call('PEXPIRE', record, lease_ms + keep) end
return renewed
