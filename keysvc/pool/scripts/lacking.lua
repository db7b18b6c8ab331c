-- Keys of the pool a replica lacks (neither they nor, for a clone, the parent are in its
-- key list), one batch: ARGV[4] the list's id, ARGV[5] after load position, ARGV[6] how
-- many keys to look at. Returns {last position looked at ("" none), hash...}.
local held = P .. 'held:' .. ARGV[4]
local rows = redis.call('ZRANGEBYSCORE', P .. 'order', '(' .. ARGV[5], '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[6]))
local out = {''}
for i = 1, #rows, 2 do
  if not holds(held, rows[i]) then out[#out + 1] = rows[i] end
  out[1] = rows[i + 1]
end
return out
