-- Report on one process's budget slice of one counter and size it again (stores.slices): the
-- calls it settled since its last report are charged, then the slice is granted what its calls
-- in flight still hold plus an extra of at most 1/div of the room left, or returned.
-- KEYS: counter, lease set, spend index (the counter again when not indexed), ledger stream,
-- the slice's record (highest report applied), then the call record (as reserve.lua names it)
-- of each call checked (ARGV 19), then of each call admitted (ARGV 20).
-- ARGV: 1 slice id, 2 seq (this report's number; reports of a slice apply in order, once),
-- 3 limit, 4 expires_at or '', 5 alerts ('' keeps stored ones), 6 index member ('' for none),
-- 7 kept (what its calls in flight hold: always granted), 8 want (extra asked for), 9 need (the
-- least extra worth granting: less is none), 10 div, 11 lease_ms, 12 retry_ms, 13 ledger max
-- rows, 14 ledger retention ms, 15 n (calls reported), 16 what they cost on this counter
-- together (below zero, '-' .. digits, when late settles cost less than what expiry charged
-- for them), 17 how many ledger rows, 18 what they share as one JSON object, 19 m (calls
-- checked), 20 a (calls admitted), then the rows (LedgerRow.packed objects, each with its
-- amount x), written as one stream entry (fields J: their JSON array, and C): a row per entry
-- cost Redis ~7 µs a row, and the stream's MAXLEN counts entries, so a batch entry trims at max
-- rows / count; then (kind, amount, call id, row number or 0) per call checked, then (token,
-- lease ms left) per call admitted. If the slice's lease ends, expiry charges all of it (its
-- process may have served calls it never reported).
-- Call records: a call admitted from a slice gets its record 'h:<token>' for its lease and the
-- retry window (as a reserve gives one), so that another store that settles it (settle.lua) finds
-- it. A reported call whose record shows it settled ('s': by another store's settle) is skipped:
-- that settle charged it, once (its amount is taken back from the total, its row left out).
-- Else a settle (kind s, or l: late, after expiry) marks it settled; an expiry charge (e) is
-- remembered as '!' .. id, as a reaped hold's, for a settle from anywhere to replace; a late
-- settle, or a release (r) after expiry, drops that.
-- Returns {code, grant, spent, held (holds and slices, with this grant), then (1, threshold,
-- spent) per alert fired}: code 1 applied, 2 this seq was applied before (nothing changed, but
-- for a reaped slice's charge replaced once; grant is the slice's grant now).
local c, l, x, stream, srec = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local sid = ARGV[1]
if type(sid) ~= 'string' or not string.match(sid, '^%w+$') or #sid > 64 then
  error('budgetguard: slice id must be a short word, got ' .. tostring(sid))
end
local seq = ARGV[2]
if not (string.match(seq, '^%d+$') and #seq <= 15) then
  error('budgetguard: seq must be a whole number, got ' .. tostring(seq))
end
local limit = check_nano(ARGV[3], 'limit')
local expires = ARGV[4]
if expires ~= '' and not (string.match(expires, '^%d+$') and #expires <= 12) then
  error('budgetguard: expires_at must be epoch seconds or empty, got ' .. tostring(expires))
end
local alerts = check_alerts(ARGV[5])
local member = ARGV[6]
local kept = check_nano(ARGV[7], 'kept')
local want = check_nano(ARGV[8], 'want')
local need = check_nano(ARGV[9], 'need')
local div = tonumber(ARGV[10])
if not div or div < 1 or div > 1000000 or div ~= math.floor(div) then
  error('budgetguard: div must be a whole number in [1, 1e6], got ' .. tostring(ARGV[10]))
end
local lease_ms = check_ms(ARGV[11], 'lease_ms')
local keep = check_ms(ARGV[12], 'retry_ms')
local max_rows, keep_rows_ms = ARGV[13], ARGV[14]
check_ledger_options(max_rows, keep_rows_ms)
local n = tonumber(ARGV[15])
if not n or n < 0 or n ~= math.floor(n) or #KEYS < 5 then
  error('budgetguard: n must be a whole number (calls reported), and KEYS at least five')
end
-- A reported amount below zero ('-' .. digits) is a late settle below what expiry charged.
local function magnitude(a)
  if string.sub(a, 1, 1) == '-' then return string.sub(a, 2), true end
  return a, false
end
local total, refund = magnitude(ARGV[16])
check_nano(total, 'reported amount')
local rows, m, a = tonumber(ARGV[17]), tonumber(ARGV[19]), tonumber(ARGV[20])
if not (rows and m and a) or rows < 0 or rows ~= math.floor(rows) or rows > n or m < 0 or m ~= math.floor(m)
    or m > n or a < 0 or a ~= math.floor(a) or #ARGV ~= 20 + rows + 4 * m + 2 * a or #KEYS ~= 5 + m + a
    or (rows > 0) ~= (string.sub(ARGV[18], 1, 1) == '{') or #ARGV[18] > 65536 then
  error('budgetguard: ledger rows, calls checked and admitted come as counts (rows and checked at most n) '
        .. 'with their arguments and keys, got ' .. tostring(ARGV[17]))
end
local size = 0
for i = 21, 20 + rows do
  if string.sub(ARGV[i], 1, 1) ~= '{' then error('budgetguard: a ledger row must be a JSON object') end
  size = size + #ARGV[i]
end
if size > 16777216 then error('budgetguard: ledger rows above 16 MB') end
local checks, admits = 20 + rows, 20 + rows + 4 * m
for j = 1, m do
  local b = checks + 4 * (j - 1)
  local kind, amount, id, row = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], tonumber(ARGV[b + 4])
  if not (kind == 's' or kind == 'e' or kind == 'l' or kind == 'r') or #id == 0 or #id > 2048
      or not row or row < 0 or row > rows or row ~= math.floor(row) then
    error('budgetguard: a call checked comes as kind (s, e, l, r), amount, call id, row number')
  end
  check_nano((magnitude(amount)), 'call amount')
end
for j = 1, a do
  local token, left = ARGV[admits + 2 * j - 1], ARGV[admits + 2 * j]
  if token == '' or string.find(token, ':', 1, true) then error('budgetguard: a token has no ":"') end
  check_ms(left, 'lease ms left')
end

local now = now_ms()
local out, fired = {1, '0', '0', '0'}, {}
local function reply()
  local state = redis.call('HMGET', c, 's', 'h', 'g')
  local v = redis.call('HGET', c, '%' .. sid)
  out[2] = v and string.match(v, '^(%d+):') or '0'
  out[3] = state[1] or '0'
  out[4] = held_of(state[2], state[3])
  for _, f in ipairs(fired) do out[#out + 1] = f end
  return out
end
reap(c, l, now, keep)
fire_alerts(c, 1, fired)
-- A slice its lease already reaped has no grant left, and what expiry charged for it is
-- replaced by what this report says.
local v = redis.call('HGET', c, '%' .. sid)
local charged = not v and redis.call('HGET', c, '!' .. SLICE .. sid)
local seen = redis.call('GET', srec)
local again = seen and tonumber(seen) >= tonumber(seq)
-- A report applied before changes nothing, unless it is the last one applied and the slice's
-- lease reaped the slice since (its reply was lost, then Redis was away past the lease): its
-- batch was charged then, and the charge of the grant it made is replaced now, once ('!' goes).
if again and not (charged and tonumber(seen) == tonumber(seq)) then
  out[1] = 2
  return reply()
end
local old = v and string.match(v, '^(%d+):') or '0'
if charged then
  sub_spent(c, charged)
  redis.call('HDEL', c, '!' .. SLICE .. sid)
  redis.call('ZREM', l, TAB .. SLICE .. sid)
end
if again then
  out[1] = 2
else
  if refund then sub_spent(c, total) else add_spent(c, total) end
  local skipped = {}
  for j = 1, m do
    local b = checks + 4 * (j - 1)
    local kind, amount, id, row = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], tonumber(ARGV[b + 4])
    local r = KEYS[5 + j]
    local rec = redis.call('GET', r)
    if rec and string.sub(rec, 1, 1) == 's' then  -- settled by another store: charged there
      local mag, below_zero = magnitude(amount)
      if below_zero then add_spent(c, mag) else sub_spent(c, mag) end
      if row > 0 then skipped[row] = true end
    else
      if kind == 's' or kind == 'l' then  -- (settled here: nothing charges it later, as after a settle.lua)
        redis.call('SET', r, 's', 'PX', keep)
      end
      if kind == 'e' then
        if amount ~= '0' then
          redis.call('HSET', c, '!' .. id, amount)
          redis.call('ZADD', l, now + keep, TAB .. id)
        end
      elseif kind ~= 's' and redis.call('HDEL', c, '!' .. id) == 1 then
        redis.call('ZREM', l, TAB .. id)
      end
    end
  end
  for j = 1, a do
    local r, token, left = KEYS[5 + m + j], ARGV[admits + 2 * j - 1], tonumber(ARGV[admits + 2 * j])
    if not redis.call('SET', r, 'h:' .. token, 'PX', left + keep, 'NX') then
      local rec = redis.call('GET', r)  -- settled already (by another store): kept as long as a hold's
      if rec and string.sub(rec, 1, 1) == 's' and redis.call('PTTL', r) < left + keep then
        redis.call('PEXPIRE', r, left + keep)
      end
    end
  end
  local kept_rows = {}
  for i = 1, rows do
    if not skipped[i] then kept_rows[#kept_rows + 1] = ARGV[20 + i] end
  end
  if max_rows ~= '' and max_rows ~= '0' and #kept_rows > 0 then
    local entries = math.max(1, math.floor(tonumber(max_rows) / #kept_rows))
    redis.call('XADD', stream, 'MAXLEN', '~', string.format('%d', entries), '*', 'n', tostring(#kept_rows),
               'J', '[' .. table.concat(kept_rows, ',') .. ']', 'C', ARGV[18])
    if keep_rows_ms ~= '' then
      redis.call('XTRIM', stream, 'MINID', '~', tostring(now - tonumber(keep_rows_ms)))
    end
  end
  fire_alerts(c, 1, fired)
end

-- Size the slice in the room the others leave: limit - spent - holds - (slices - this one), at
-- most 1/(div + 4 per other slice) of it: many processes' slices together stay a small part of
-- what is left, so that none is refused while others hold free room.
local state = redis.call('HMGET', c, 's', 'h', 'g', 'n')
local others = minus(state[3] or '0', old)
local room = minus(limit, plus(plus(state[1] or '0', state[2] or '0'), others))
local peers = tonumber(state[4] or '0') - (v and 1 or 0)
local extra = divided(minus(room, kept), math.min(1000000, div + 4 * math.max(0, peers)))
if below(want, extra) then extra = want end
if below(extra, need) then extra = '0' end
local grant = plus(kept, extra)
if below(old, grant) then
  redis.call('HINCRBY', c, 'g', minus(grant, old))
elseif below(grant, old) and redis.call('HINCRBY', c, 'g', neg(minus(old, grant))) == 0 then
  redis.call('HDEL', c, 'g')
end
if grant ~= '0' then
  if not v then redis.call('HINCRBY', c, 'n', 1) end
  redis.call('HSET', c, '%' .. sid, grant .. ':' .. grant) -- expiry charges the whole slice
  redis.call('ZADD', l, now + lease_ms, SLICE .. sid)
elseif v then
  if redis.call('HINCRBY', c, 'n', -1) <= 0 then redis.call('HDEL', c, 'n') end
  redis.call('HDEL', c, '%' .. sid)
  redis.call('ZREM', l, SLICE .. sid)
end
if alerts ~= '' and redis.call('HGET', c, 'a') ~= alerts then redis.call('HSET', c, 'a', alerts) end
redis.call('SET', srec, seq, 'PX', lease_ms + keep)
if redis.call('EXISTS', c) == 1 then
  keep_until(c, l, expires, now)
  index_spent(c, x, member)
end
return reply()
