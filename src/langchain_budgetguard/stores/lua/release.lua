-- Undo a reservation that the rest of its call could not place: drop call_id's holds, charge
-- nothing, and forget the call so that a retried reserve starts afresh.
-- KEYS: call record, then (counter, lease set) per counter. ARGV: call_id.
local record, id = KEYS[1], ARGV[1]
for i = 1, (#KEYS - 1) / 2 do
  local c, l = KEYS[2 * i], KEYS[2 * i + 1]
  local v = redis.call('HGET', c, '@' .. id)
  if v then drop(c, l, id, v) end
end
redis.call('DEL', record)
return 1
