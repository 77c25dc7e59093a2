-- Read a budget's live limit overrides (field -> nano-USD) and their version.
-- KEYS: the budget's override hash. ARGV: the version the caller already has ('' for none).
-- Returns {version} when the caller's version is current, else {version, {field1, nano1, ...}}.
-- Field '#v' holds the version, new on every change (override.lua); '#n' counts the changes.
local v = redis.call('HGET', KEYS[1], '#v') or '0'
if v == ARGV[1] then return {v} end
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if all[i] ~= '#v' and all[i] ~= '#n' then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return {v, out}
