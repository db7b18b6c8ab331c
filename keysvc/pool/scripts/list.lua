-- One List page's keys: up to ARGV[5] keys after load position ARGV[4].
-- Returns {now, last position looked at ("" when none), view...}.
local rows = redis.call('ZRANGEBYSCORE', P .. 'order', '(' .. ARGV[4], '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[5]))
local out = {num(NOW), ''}
for i = 1, #rows, 2 do
  out[#out + 1] = key_view(rows[i])
  out[2] = rows[i + 1]
end
return out
