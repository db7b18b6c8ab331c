-- Recheck without a key checker: every key unchecked, every disabled key back in service
-- (KeyPool.recheck). One pass over the pool: it is rare, and atomic like the rest.
for _, h in ipairs(redis.call('ZRANGE', P .. 'order', 0, -1)) do
  local k = P .. 'key:' .. h
  redis.call('HSET', k, 'lc', '0')
  if redis.call('HGET', k, 'dis') == '1' then
    redis.call('HSET', k, 'dis', '0', 'rev', '0', 'oq', '0', 'dat', '0')
    redis.call('HDEL', k, 'reason')
    redis.call('SREM', P .. 'disabled', h)
    place_all(record(h), h, NOW)
  end
end
redis.call('PUBLISH', P .. 'wake', '')
return 'OK'
