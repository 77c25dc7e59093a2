-- Helpers shared by every budget script; the store prepends this file to each one.
--
-- Layout of one counter (see stores/redis.py): a hash with fields s (spent), h (held),
-- '@' .. call_id = 'amount:charge_on_expiry' for each live hold and '!' .. call_id = charge for
-- each hold that expiry charged here since the last reset (so that a late settle replaces that
-- charge on this counter only), a = its alert thresholds ('t1,t2,...', ascending; absent: none)
-- and 'A' .. t for each threshold t fired since the counter began or was reset; and a sorted set
-- of deadlines in ms of server TIME: member call_id for a live hold's lease, member
-- TAB .. call_id for when that expiry charge is forgotten.
-- Leased slices (stores.slices): '%' .. slice_id = 'grant:charge_on_expiry' for each process's
-- live slice, g = the sum of their grants, n = how many, lease-set member SLICE .. slice_id its
-- deadline; a slice whose lease ended is charged its charge_on_expiry, remembered as
-- '!' .. SLICE .. slice_id for a late report to replace. Holds and slices both count against the
-- limit: spent + h + g <= limit.
-- KEYS of a counter script come in pairs after the call record: counter hash, lease set.
--
-- Money stays in decimal strings handed to HINCRBY: Lua numbers are doubles (exact only below
-- 2^53) and print large values in exponent form, so no amount is ever computed in Lua.
-- Every amount is at most MAX (2^62); spent saturates at MAX, so no HINCRBY ever overflows.
-- Each script checks all of its ARGV before its first write: it fails whole or not at all.

local B = 1000000000
local MAX = '4611686018427387904'
local MAX_MS = 2592000000 -- 30 days
local TAB = '\t'
local SLICE = '\n' -- no call id holds a newline: lease-set members SLICE .. id are slices

-- Server time in ms; every script reads it once, so a call never depends on a client clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A decimal integer string as (high, low) in base 1e9, exact for every 64-bit value.
local function split(s)
  if not s then return 0, 0 end
  local n = #s
  if n <= 15 then
    local v = tonumber(s)
    local hi = math.floor(v / B)
    return hi, v - hi * B
  end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
end

-- spent + held + amount <= limit, computed exactly.
local function fits(spent, held, amount, limit)
  local h1, l1 = split(spent)
  local h2, l2 = split(held)
  local h3, l3 = split(amount)
  local h4, l4 = split(limit)
  local lo = l1 + l2 + l3
  local hi = h1 + h2 + h3 + math.floor(lo / B)
  lo = lo - math.floor(lo / B) * B
  return hi < h4 or (hi == h4 and lo <= l4)
end

-- Exact sums and differences of amounts (decimal strings), through (high, low) pairs.
local function join(hi, lo)
  if hi == 0 then return string.format('%d', lo) end
  return string.format('%d%09d', hi, lo)
end

local function plus(a, b)
  local h1, l1 = split(a)
  local h2, l2 = split(b)
  local lo = l1 + l2
  local carry = math.floor(lo / B)
  return join(h1 + h2 + carry, lo - carry * B)
end

-- a < b
local function below(a, b)
  local h1, l1 = split(a)
  local h2, l2 = split(b)
  return h1 < h2 or (h1 == h2 and l1 < l2)
end

-- max(0, a - b)
local function minus(a, b)
  if not below(b, a) then return '0' end
  local h1, l1 = split(a)
  local h2, l2 = split(b)
  local lo, hi = l1 - l2, h1 - h2
  if lo < 0 then lo, hi = lo + B, hi - 1 end
  return join(hi, lo)
end

-- floor(a / d) for a whole d in [1, 1e6]
local function divided(a, d)
  local h, l = split(a)
  local qh = math.floor(h / d)
  local x = (h - qh * d) * B + l
  return join(qh, math.floor(x / d))
end

-- Argument checks: raise before anything is written.
local function check_nano(s, what)
  if type(s) ~= 'string' or not string.match(s, '^%d+$') or #s > 19 or not fits(s, '0', '0', MAX) then
    error('budgetguard: ' .. what .. ' must be an integer in [0, 2^62], got ' .. tostring(s))
  end
  return s
end

local function check_ms(s, what)
  local v = type(s) == 'string' and string.match(s, '^%d+$') and #s <= 13 and tonumber(s)
  if not v or v < 1 or v > MAX_MS then
    error('budgetguard: ' .. what .. ' must be whole ms in [1, 30 days], got ' .. tostring(s))
  end
  return v
end

-- '-' .. s, except that Redis refuses '-0' as an integer.
local function neg(s)
  if s == '0' then return '0' end
  return '-' .. s
end

-- spent += amount, saturating at MAX.
local function add_spent(c, amount)
  if amount == '0' then return end
  local s = redis.call('HGET', c, 's') or '0'
  if fits(s, '0', amount, MAX) then
    redis.call('HINCRBY', c, 's', amount)
  else
    redis.call('HSET', c, 's', MAX)
  end
end

-- spent -= amount, never below zero.
local function sub_spent(c, amount)
  if amount == '0' then return end
  local s = redis.call('HGET', c, 's') or '0'
  if fits(amount, '0', '0', s) then
    redis.call('HINCRBY', c, 's', neg(amount))
  else
    redis.call('HSET', c, 's', '0')
  end
end

-- A settle's or report's ledger options: max rows and retention ms ('' for none of either).
local function check_ledger_options(max_rows, keep_rows_ms)
  if max_rows ~= '' and not (string.match(max_rows, '^%d+$') and #max_rows <= 10) then
    error('budgetguard: ledger max rows must be a whole number, got ' .. tostring(max_rows))
  end
  if keep_rows_ms ~= '' and not (string.match(keep_rows_ms, '^%d+$') and #keep_rows_ms <= 13) then
    error('budgetguard: ledger retention must be whole ms, got ' .. tostring(keep_rows_ms))
  end
end

-- Alert thresholds as ARGV gives them: '' (none given) or 't1,t2,...', each in [1, MAX].
local function check_alerts(s)
  if s == '' then return s end
  if type(s) ~= 'string' or not string.match(s, '^[%d,]+$') or #s > 4000 then
    error('budgetguard: alerts must be comma-separated thresholds, got ' .. tostring(s))
  end
  local count = 0
  for t in string.gmatch(s .. ',', '([^,]*),') do
    if not string.match(t, '^[1-9]%d*$') then
      error('budgetguard: an alert threshold must be an integer in [1, 2^62], got ' .. tostring(s))
    end
    check_nano(t, 'alert threshold')
    count = count + 1
  end
  if count > 200 then error('budgetguard: at most 200 alert thresholds per counter') end
  return s
end

-- Fire counter c's stored thresholds that its spent has reached and that have not fired yet:
-- each is marked 'A' .. t (HSETNX: once per counter until a reset) and appended to out as
-- (i, threshold, spent). Called after every change a script makes to spent (and after reaps).
local function fire_alerts(c, i, out)
  local a = redis.call('HGET', c, 'a')
  if not a then return end
  local s = redis.call('HGET', c, 's') or '0'
  for t in string.gmatch(a, '%d+') do
    if fits(t, '0', '0', s) and redis.call('HSETNX', c, 'A' .. t, '1') == 1 then
      out[#out + 1] = i
      out[#out + 1] = t
      out[#out + 1] = s
    end
  end
end

-- Remove one live hold (its field value v) from counter c and its lease set l; charge nothing.
local function drop(c, l, id, v)
  local amount = string.match(v, '^(%d+):')
  redis.call('HINCRBY', c, 'h', neg(amount))
  redis.call('HDEL', c, '@' .. id)
  redis.call('ZREM', l, id)
end

-- Undo what expiry charged call id on counter c (if it did, since the last reset).
local function unexpire(c, l, id)
  local charged = redis.call('HGET', c, '!' .. id)
  if charged then
    sub_spent(c, charged)
    redis.call('HDEL', c, '!' .. id)
    redis.call('ZREM', l, TAB .. id)
  end
end

-- Money held by holds and slices together.
local function held_of(h, g)
  if not g then return h or '0' end
  return plus(h or '0', g)
end

-- Remove slice sid (its field value v) from counter c and its lease set l; charge nothing.
local function drop_slice(c, l, sid, v)
  local grant = string.match(v, '^(%d+):')
  if redis.call('HINCRBY', c, 'g', neg(grant)) == 0 then redis.call('HDEL', c, 'g') end
  if redis.call('HINCRBY', c, 'n', -1) <= 0 then redis.call('HDEL', c, 'n') end
  redis.call('HDEL', c, '%' .. sid)
  redis.call('ZREM', l, SLICE .. sid)
end

-- Charge what a hold or slice whose lease ended (lease-set member id, field value v
-- 'amount:charge') charges on expiry, remembered for keep_ms for a late settle or report to replace.
local function charge_expired(c, l, id, v, now, keep_ms)
  local charge = string.match(v, ':(%d+)$')
  if charge ~= '0' then
    add_spent(c, charge)
    redis.call('HSET', c, '!' .. id, charge)
    redis.call('ZADD', l, now + keep_ms, TAB .. id)
  end
end

-- Reap holds whose lease ended by now: release each and charge its charge_on_expiry, which is
-- remembered for keep_ms (the retry window) for a late settle to replace. Forget such charges
-- once their time is up. Slices whose lease ended likewise (a late report replaces the charge).
-- The lease set disappears once empty (Redis deletes empty sorted sets).
local function reap(c, l, now, keep_ms)
  local ids = redis.call('ZRANGEBYSCORE', l, '-inf', now)
  for _, id in ipairs(ids) do
    local head = string.sub(id, 1, 1)
    if head == TAB then
      redis.call('HDEL', c, '!' .. string.sub(id, 2))
      redis.call('ZREM', l, id)
    else  -- a hold (member call_id, field '@' .. id) or a slice (SLICE .. sid, field '%' .. sid)
      local sid = head == SLICE and string.sub(id, 2) or nil
      local v = redis.call('HGET', c, sid and '%' .. sid or '@' .. id)
      if v then
        if sid then drop_slice(c, l, sid, v) else drop(c, l, id, v) end
        charge_expired(c, l, id, v, now, keep_ms)
      else
        redis.call('ZREM', l, id)
      end
    end
  end
end

-- Counter c lives until the latest expires_at a reservation gave it (none: no expiry), and its
-- lease set a second longer, so that a hold is never left without its deadline.
local function keep_until(c, l, expires, now)
  if expires ~= '' then
    local ttl = redis.call('PTTL', c)
    if ttl < 0 or now + ttl < tonumber(expires) * 1000 then
      redis.call('EXPIREAT', c, expires)
    end
  end
  local ttl = redis.call('PTTL', c)
  if ttl > 0 then redis.call('PEXPIRE', l, ttl + 1000) end
end

-- The spend index of counter c: sorted set x, member the counter's (escaped) id, score its spent;
-- it lives as long as its longest-lived counter. member '' means c is not indexed (x unused).
local function index_spent(c, x, member)
  if member == '' then return end
  local fresh = redis.call('EXISTS', x) == 0
  redis.call('ZADD', x, redis.call('HGET', c, 's') or '0', member)
  local ends = redis.call('PEXPIRETIME', c)
  if ends == -1 then
    redis.call('PERSIST', x)
  elseif ends > 0 then
    local have = redis.call('PEXPIRETIME', x)
    if fresh or (have >= 0 and have < ends) then redis.call('PEXPIREAT', x, ends) end
  end
end
