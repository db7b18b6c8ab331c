-- Recheck without a key checker: every key unchecked, every disabled key back in service
-- (KeyPool.recheck). One pass over the pool: it is rare, and atomic like the rest.
-- ARGV[4] "1": a key checker runs; disabled keys stay disabled, marked to come back
-- when their new check finds them alive (revive).
local until_checked = ARGV[4] == '1'
for _, h in ipairs(redis.call('ZRANGE', P .. 'order', 0, -1)) do
  local k = P .. 'key:' .. h
  redis.call('HSET', k, 'lc', '0')
  if until_checked then
    redis.call('HSET', k, 'revive', redis.call('HGET', k, 'dis') == '1' and '1' or '0')
  elseif redis.call('HGET', k, 'dis') == '1' then
    redis.call('HSET', k, 'dis', '0', 'rev', '0', 'oq', '0', 'dat', '0')
    redis.call('HDEL', k, 'reason')
    redis.call('SREM', P .. 'disabled', h)
    place_all(record(h), h, NOW)
  end
end
redis.call('PUBLISH', P .. 'wake', '')
return 'OK'
