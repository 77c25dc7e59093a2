-- Helpers shared by every budget script; the store prepends this file to each one.
--
-- Layout of one counter (see stores/redis.py): a hash with fields s (spent), h (held) and
-- '@' .. call_id = 'amount:charge_on_expiry' for each live hold, and a sorted set of lease
-- deadlines (member call_id, score: deadline in ms of server TIME).
-- KEYS of a counter script come in pairs after the call record: counter hash, lease set.
--
-- Money stays in decimal strings handed to HINCRBY: Lua numbers are doubles (exact only below
-- 2^53) and print large values in exponent form, so no amount is ever computed in Lua.

local B = 1000000000

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

-- '-' .. s, except that Redis refuses '-0' as an integer.
local function neg(s)
  if s == '0' then return '0' end
  return '-' .. s
end

-- Remove one live hold (its field value v) from counter c and its lease set l; charge nothing.
local function drop(c, l, id, v)
  local amount = string.match(v, '^(%d+):')
  redis.call('HINCRBY', c, 'h', neg(amount))
  redis.call('HDEL', c, '@' .. id)
  redis.call('ZREM', l, id)
end

-- Reap holds whose lease ended by now: release each and charge its charge_on_expiry.
-- The lease set disappears once empty (Redis deletes empty sorted sets).
local function reap(c, l, now)
  local ids = redis.call('ZRANGEBYSCORE', l, '-inf', now)
  for _, id in ipairs(ids) do
    local v = redis.call('HGET', c, '@' .. id)
    if v then
      local charge = string.match(v, ':(%d+)$')
      drop(c, l, id, v)
      if charge ~= '0' then redis.call('HINCRBY', c, 's', charge) end
    else
      redis.call('ZREM', l, id)
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
