-- Undo a reservation whose call does not go ahead: drop call_id's holds (and what expiry charged
-- for them), charge nothing. Only the attempt that owns the record (same token, or no record
-- yet) is released: another attempt's hold and a settled call stay as they are.
-- KEYS: call record, then (counter, lease set) per counter.
-- ARGV: call_id, token, tombstone_ms ('' forgets the call so that a new attempt may start;
-- else the record becomes 'r' for that long, so that a reserve still in flight is refused).
-- Returns 1 when released, 0 when the record belongs to another attempt or a settled call.
local record, id, token = KEYS[1], ARGV[1], ARGV[2]
local tomb = ARGV[3] ~= '' and check_ms(ARGV[3], 'tombstone_ms')
local rec = redis.call('GET', record)
if rec and rec ~= 'h:' .. token and rec ~= 'r' then return 0 end
for i = 1, (#KEYS - 1) / 2 do
  local c, l = KEYS[2 * i], KEYS[2 * i + 1]
  local v = redis.call('HGET', c, '@' .. id)
  if v then drop(c, l, id, v) else unexpire(c, l, id) end
end
if tomb then
  redis.call('SET', record, 'r', 'PX', tomb)
else
  redis.call('DEL', record)
end
return 1
