-- Zero one counter's spent after reaping expired holds; live holds and slices stay (their calls
-- settle as usual). What expiry charged before is forgotten with it: a late settle then adds its amount
-- to the fresh counter and takes nothing off it. Fired alerts ('A' .. t) are cleared: the next
-- crossing alerts again.
-- KEYS: counter hash, lease set[, spend index]. ARGV: retry_ms[, member in the index].
-- Returns {spent, held} as they were before.
local c, l = KEYS[1], KEYS[2]
local keep = check_ms(ARGV[1], 'retry_ms')
reap(c, l, now_ms(), keep)
local state = redis.call('HMGET', c, 's', 'h', 'g')
if redis.call('EXISTS', c) == 1 then
  redis.call('HSET', c, 's', '0')
  for _, f in ipairs(redis.call('HKEYS', c)) do
    local head = string.sub(f, 1, 1)
    if head == '!' then
      redis.call('HDEL', c, f)
      redis.call('ZREM', l, TAB .. string.sub(f, 2))
    elseif head == 'A' then
      redis.call('HDEL', c, f)
    end
  end
end
if KEYS[3] and redis.call('EXISTS', c) == 1 then index_spent(c, KEYS[3], ARGV[2]) end
return {state[1] or '0', held_of(state[2], state[3])}
