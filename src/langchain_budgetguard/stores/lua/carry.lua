-- Settles carried by a reservation (or flushed on their own), in one script call on one hash
-- tag: settle.lua for each queued settle, in order, then reserve.lua (when r is '1'). Each runs
-- exactly as it does alone (same checks, same idempotency), only without a round trip between.
-- ARGV: m (how many settles), r ('1': a reserve follows, '0': none), then (key count, argument
-- count) per settle, then each settle's arguments, then the reserve's.
-- KEYS: each settle's keys, then the reserve's.
-- Returns {the reserve's reply (0 without one), settle reply 1, ..., settle reply m}.
local m, r = tonumber(ARGV[1]), ARGV[2] == '1'
local function slice(t, from, count)
  local part = {}
  for j = 0, count - 1 do part[j + 1] = t[from + j] end
  return part
end
local replies = {0}
local ki, ai = 1, 3 + 2 * m
for s = 1, m do
  local nk, na = tonumber(ARGV[1 + 2 * s]), tonumber(ARGV[2 + 2 * s])
  replies[s + 1] = settle_one(slice(KEYS, ki, nk), slice(ARGV, ai, na))
  ki, ai = ki + nk, ai + na
end
if r then
  replies[1] = reserve_one(slice(KEYS, ki, #KEYS - ki + 1), slice(ARGV, ai, #ARGV - ai + 1))
end
return replies
