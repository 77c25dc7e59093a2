-- Read part of one ledger stream, newest first, and return only the entries that may hold a row
-- a reader asked for: the reader parses those and applies its exact filter (stores.ledger
-- row_matches), so a test here may let through more than it must, never less. Reads only.
-- KEYS: ledger stream.
-- ARGV: 1 max id ('+', or '(' .. id to go on below an entry), 2 min id ('-', or ms), 3 how many
-- entries to scan (1..5000: each call blocks Redis for ~5 us an entry), 4 budget (the b field;
-- '' any), 5 budget as JSON ('"name"'), 6 scope needle ('' none: a plain substring of the
-- scopes' JSON, '"user":"alice"'), 7 kinds ('' any, else ',refusal,degrade,' ...).
-- A row of one entry (fields k, b, f, s, ...) is tested field by field; a batch entry (fields J,
-- C: a leased slice's report, stores.ledger.LedgerRow.packed_batch) by substrings of its JSON.
-- Returns {entries scanned, id of the last one scanned ('' for none), then id, fields per entry
-- that may match}.
local stream, high, low = KEYS[1], ARGV[1], ARGV[2]
local count = tonumber(ARGV[3])
if not count or count < 1 or count > 5000 or count ~= math.floor(count) or #ARGV ~= 7 then
  error('budgetguard: ledger scan: count must be a whole number in [1, 5000], ARGV seven')
end
local budget, budget_json, needle, kinds = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local want_degrade = string.find(kinds, ',degrade,', 1, true) ~= nil
local want_refusal = string.find(kinds, ',refusal,', 1, true) ~= nil
local budget_needle = '"b":' .. budget_json

local function batch_may_match(j, c)
  if budget ~= '' and not (string.find(c, budget_needle, 1, true) or string.find(j, budget_needle, 1, true)) then
    return false
  end
  if needle ~= '' and not (string.find(c, needle, 1, true) or string.find(j, needle, 1, true)) then
    return false
  end
  if kinds == '' then return true end
  for kind in string.gmatch(kinds, '[^,]+') do
    local k = '"k":"' .. kind .. '"'
    if string.find(c, k, 1, true) or string.find(j, k, 1, true) then return true end
  end
  if want_degrade and (string.find(c, '"f":"[a-z]*d') or string.find(j, '"f":"[a-z]*d')) then return true end
  if want_refusal and (string.find(c, '"f":"[a-z]*r') or string.find(j, '"f":"[a-z]*r')) then return true end
  return false
end

local function may_match(f)
  local k, b, fl, sc, j, c = 'call', nil, '', nil, nil, nil
  for i = 1, #f, 2 do
    local name = f[i]
    if name == 'k' then k = f[i + 1]
    elseif name == 'b' then b = f[i + 1]
    elseif name == 'f' then fl = f[i + 1]
    elseif name == 's' then sc = f[i + 1]
    elseif name == 'J' then j = f[i + 1]
    elseif name == 'C' then c = f[i + 1]
    end
  end
  if j then return batch_may_match(j, c or '') end
  if budget ~= '' and b ~= budget then return false end
  if needle ~= '' and not (sc and string.find(sc, needle, 1, true)) then return false end
  if kinds == '' or string.find(kinds, ',' .. k .. ',', 1, true) then return true end
  return (want_degrade and string.find(fl, 'd', 1, true) ~= nil)
      or (want_refusal and string.find(fl, 'r', 1, true) ~= nil)
end

local entries = redis.call('XREVRANGE', stream, high, low, 'COUNT', count)
local out = {#entries, ''}
if #entries > 0 then out[2] = entries[#entries][1] end
for _, e in ipairs(entries) do
  if may_match(e[2]) then
    out[#out + 1] = e[1]
    out[#out + 1] = e[2]
  end
end
return out
