-- Replace call_id's hold on every counter of one hash tag with the actual cost. Where the hold
-- already expired, what expiry charged on that counter (since its last reset) is replaced.
-- KEYS: call record, journal mark, ledger stream, then (counter, lease set, spend index) per
-- counter.
-- ARGV: call_id, amount, retry_ms, seq, mark_ttl_ms, ledger max rows ('' or '0': no row),
-- ledger retention ms, attempt (a random word per settle the client makes, the same on its
-- retries; '' for none), then what each counter is charged, then each counter's member in its
-- spend index ('' for none), then the ledger row's fields (name, value, ...; none: no row).
-- When the settle applies, the row is XADDed with amount (field x); its id is the server time.
-- seq '' for a live settle; for a journal replay, the entry's sequence number: the journal mark
-- (a string, the highest seq applied on this tag) makes a replay count once however late;
-- mark_ttl_ms '' keeps the mark forever.
-- Returns {1, then (i, threshold, spent) per alert fired} when applied, {0} when this call was
-- settled before (nothing changed). The record keeps the alerts fired with the attempt that
-- applied ('s:<attempt>:i,t,s,...'; plain 's' when none fired), so that a retry of that attempt
-- (its reply was lost) gets {0, its alerts} again, and any other settle none.
local record, mark, id, amount = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
check_nano(amount, 'amount')
local keep = check_ms(ARGV[3], 'retry_ms')
local seq = ARGV[4]
if seq ~= '' and not (string.match(seq, '^%d+$') and #seq <= 15) then
  error('budgetguard: seq must be a whole number, got ' .. tostring(seq))
end
local mark_ttl = ARGV[5] ~= '' and check_ms(ARGV[5], 'mark_ttl_ms')
local stream, max_rows, keep_rows_ms = KEYS[3], ARGV[6], ARGV[7]
local attempt = ARGV[8]
if type(attempt) ~= 'string' or not string.match(attempt, '^%w*$') or #attempt > 64 then
  error('budgetguard: attempt must be a short word, got ' .. tostring(attempt))
end
local n = (#KEYS - 3) / 3
for i = 1, n do check_nano(ARGV[8 + i], 'counter amount') end
check_ledger_options(max_rows, keep_rows_ms)
if (#ARGV - 8 - 2 * n) % 2 ~= 0 then error('budgetguard: ledger row fields must come in pairs') end
-- Nothing to do: {0}, with the alerts this very attempt fired when it applied (a lost reply).
local function again(rec)
  local out = {0}
  local head = 's:' .. attempt .. ':'
  if attempt ~= '' and rec and string.sub(rec, 1, #head) == head then
    for v in string.gmatch(string.sub(rec, #head + 1), '%d+') do out[#out + 1] = v end
  end
  return out
end
if seq ~= '' then
  local seen = redis.call('GET', mark)
  if seen and tonumber(seen) >= tonumber(seq) then return again(redis.call('GET', record)) end
end
local function note_seq()
  if seq == '' then return end
  if mark_ttl then
    redis.call('SET', mark, seq, 'PX', mark_ttl)
  else
    redis.call('SET', mark, seq)
  end
end
local rec = redis.call('GET', record)
if rec and string.sub(rec, 1, 1) == 's' then
  note_seq()
  return again(rec)
end
local now = now_ms()
local out = {1}
local held = false
for i = 1, n do
  local c, l = KEYS[3 * i + 1], KEYS[3 * i + 2]
  reap(c, l, now, keep)
  local v = redis.call('HGET', c, '@' .. id)
  if v then drop(c, l, id, v) held = true else unexpire(c, l, id) end
  add_spent(c, ARGV[8 + i])
  fire_alerts(c, i, out)
  index_spent(c, KEYS[3 * i + 3], ARGV[8 + n + i])
end
if #ARGV > 8 + 2 * n and max_rows ~= '' and max_rows ~= '0' then
  local row = {'XADD', stream, 'MAXLEN', '~', max_rows, '*', 'x', amount}
  for j = 9 + 2 * n, #ARGV do row[#row + 1] = ARGV[j] end
  redis.call(unpack(row))
  if keep_rows_ms ~= '' then
    redis.call('XTRIM', stream, 'MINID', '~', tostring(now - tonumber(keep_rows_ms)))
  end
end
-- A call held nowhere here but with a record was admitted from a process's slice (slice.lua
-- recorded it): its record stays as long as that one would, so that the slice's report, up to
-- the end of the call's lease there, finds the call settled and charges it nothing more.
local ttl = keep
if rec and not held then ttl = math.max(keep, redis.call('PTTL', record)) end
if #out > 1 and attempt ~= '' then
  redis.call('SET', record, 's:' .. attempt .. ':' .. table.concat(out, ',', 2), 'PX', ttl)
else
  redis.call('SET', record, 's', 'PX', ttl)
end
note_seq()
return out
