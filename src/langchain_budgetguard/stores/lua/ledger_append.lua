-- Append one ledger row that charges nothing (a refusal, a degrade) to the stream of one tag.
-- KEYS: ledger stream. ARGV: max rows, retention ms, then the row's fields (name, value, ...).
local stream, max_rows, keep_rows_ms = KEYS[1], ARGV[1], ARGV[2]
if not (string.match(max_rows, '^%d+$') and #max_rows <= 10) then
  error('budgetguard: ledger max rows must be a whole number, got ' .. tostring(max_rows))
end
if not (string.match(keep_rows_ms, '^%d+$') and #keep_rows_ms <= 13) then
  error('budgetguard: ledger retention must be whole ms, got ' .. tostring(keep_rows_ms))
end
if #ARGV < 4 or #ARGV % 2 ~= 0 then error('budgetguard: ledger row fields must come in pairs') end
local row = {'XADD', stream, 'MAXLEN', '~', max_rows, '*', 'x', '0'}
for j = 3, #ARGV do row[#row + 1] = ARGV[j] end
redis.call(unpack(row))
redis.call('XTRIM', stream, 'MINID', '~', tostring(now_ms() - tonumber(keep_rows_ms)))
return 1
