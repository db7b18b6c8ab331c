-- Recheck without a key checker, one batch of keys in load order: each unchecked, each
-- disabled one back in service (KeyPool.recheck). The caller walks the pool batch by
-- batch, so no call holds Redis for the whole pool.
-- ARGV[4] "1": a key checker runs; disabled keys stay disabled, marked to come back
-- when their new check finds them alive (revive). ARGV[5] the load position after which
-- the batch starts, ARGV[6] how many keys it has at most.
-- Returns the load position of its last key, "" after the last batch.
local until_checked = ARGV[4] == '1'
local limit = tonumber(ARGV[6])
local rows = redis.call('ZRANGEBYSCORE', P .. 'order', '(' .. ARGV[5], '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
local revived = false
for i = 1, #rows, 2 do
  local h = rows[i]
  local k = P .. 'key:' .. h
  redis.call('HSET', k, 'lc', '0')
  if until_checked then
    redis.call('HSET', k, 'revive', redis.call('HGET', k, 'dis') == '1' and '1' or '0')
  elseif redis.call('HGET', k, 'dis') == '1' then
    redis.call('HSET', k, 'dis', '0', 'rev', '0', 'oq', '0', 'dat', '0')
    redis.call('HDEL', k, 'reason', 'oqu')
    redis.call('SREM', P .. 'disabled', h)
    place_all(record(h), h, NOW)
    revived = true
  end
end
if revived then redis.call('PUBLISH', P .. 'wake', '') end
if #rows < 2 * limit then return '' end
return rows[#rows]
