-- Replace call_id's hold on every counter of one hash tag with the actual cost.
-- KEYS: call record, then (counter, lease set) per counter.
-- ARGV: call_id, amount, record_ttl_ms.
-- Returns 1 when applied, 0 when this call was settled before (nothing changed).
local record, id, amount = KEYS[1], ARGV[1], ARGV[2]
local rec = redis.call('GET', record)
if rec and string.sub(rec, 1, 2) == 's:' then return 0 end
-- 'h:<charge>': the call reserved; where its hold is gone, expiry already charged <charge>.
local expired_charge = rec and string.match(rec, '^h:(%d+)$')
local now = now_ms()
for i = 1, (#KEYS - 1) / 2 do
  local c, l = KEYS[2 * i], KEYS[2 * i + 1]
  local v = redis.call('HGET', c, '@' .. id)
  if v then
    drop(c, l, id, v)
  elseif expired_charge and expired_charge ~= '0' then
    redis.call('HINCRBY', c, 's', neg(expired_charge))
  end
  if amount ~= '0' then redis.call('HINCRBY', c, 's', amount) end
  reap(c, l, now)
end
redis.call('SET', record, 's:' .. amount, 'PX', ARGV[3])
return 1
