-- Remember hash tags that hold counters (spend indexes, ledger streams), for readers to merge.
-- KEYS: the tag registry (a set). ARGV: tags ('{tag}' or '~{key}'). Returns how many were new.
return redis.call('SADD', KEYS[1], unpack(ARGV))
