-- Replace call_id's hold on every counter of one hash tag with the actual cost. Where the hold
-- already expired, what expiry charged on that counter (since its last reset) is replaced.
-- KEYS: call record, journal mark, then (counter, lease set) per counter.
-- ARGV: call_id, amount, retry_ms, seq, mark_ttl_ms.
-- seq '' for a live settle; for a journal replay, the entry's sequence number: the journal mark
-- (a string, the highest seq applied on this tag) makes a replay count once however late;
-- mark_ttl_ms '' keeps the mark forever.
-- Returns 1 when applied, 0 when this call was settled before (nothing changed).
local record, mark, id, amount = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
check_nano(amount, 'amount')
local keep = check_ms(ARGV[3], 'retry_ms')
local seq = ARGV[4]
if seq ~= '' and not (string.match(seq, '^%d+$') and #seq <= 15) then
  error('budgetguard: seq must be a whole number, got ' .. tostring(seq))
end
local mark_ttl = ARGV[5] ~= '' and check_ms(ARGV[5], 'mark_ttl_ms')
if seq ~= '' then
  local seen = redis.call('GET', mark)
  if seen and tonumber(seen) >= tonumber(seq) then return 0 end
end
local function note_seq()
  if seq == '' then return end
  if mark_ttl then
    redis.call('SET', mark, seq, 'PX', mark_ttl)
  else
    redis.call('SET', mark, seq)
  end
end
if redis.call('GET', record) == 's' then
  note_seq()
  return 0
end
local now = now_ms()
for i = 1, (#KEYS - 2) / 2 do
  local c, l = KEYS[2 * i + 1], KEYS[2 * i + 2]
  reap(c, l, now, keep)
  local v = redis.call('HGET', c, '@' .. id)
  if v then drop(c, l, id, v) else unexpire(c, l, id) end
  add_spent(c, amount)
end
redis.call('SET', record, 's', 'PX', keep)
note_seq()
return 1
