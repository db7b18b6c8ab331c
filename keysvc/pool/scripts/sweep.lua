-- Removes keys that no replica's key list holds any more, one batch of keys in load order
-- (KeyPool.remove_key, which the memory backend runs on a reload that drops a key). Held
-- sets that expired (no replica renewed them for an hour) leave the list of held sets.
-- ARGV[4] the load position after which the batch starts, ARGV[5] how many keys it has
-- at most. A replica holds its list before it adds the list's keys, so a key just added
-- is held already. Nothing is removed while no held set is live.
-- Returns {the load position of its last key ("" after the last batch), removed hash...}.
local live = {}
for _, id in ipairs(redis.call('SMEMBERS', P .. 'helds')) do
  local held = P .. 'held:' .. id
  if redis.call('EXISTS', held) == 1 then
    live[#live + 1] = held
  else
    redis.call('SREM', P .. 'helds', id)
  end
end
local limit = tonumber(ARGV[5])
local rows = redis.call('ZRANGEBYSCORE', P .. 'order', '(' .. ARGV[4], '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
local out = {''}
if #live == 0 then return out end
for i = 1, #rows, 2 do
  local h = rows[i]
  local r = record(h) or {}
  local held = false
  for _, set in ipairs(live) do
    if holds(set, h) then
      held = true
      break
    end
  end
  if not held then
    if r.dis ~= '1' and r.m ~= nil then unplace_all(r) end
    set_listing(h, r, '', {})
    local usage = redis.call('HGETALL', P .. 'usage:' .. h)
    for j = 1, #usage, 2 do redis.call('HINCRBY', P .. 'tokens', usage[j], -tonumber(usage[j + 1])) end
    local fams = redis.call('SMEMBERS', P .. 'fams:' .. h)
    fams[#fams + 1] = ''
    for _, f in ipairs(fams) do redis.call('DEL', state_key(f, h), reserved_key(f, h)) end
    redis.call('DEL', P .. 'key:' .. h, P .. 'fams:' .. h, P .. 'usage:' .. h, P .. 'answered:' .. h)
    redis.call('ZREM', P .. 'order', h)
    redis.call('SREM', P .. 'disabled', h)
    redis.call('ZREM', P .. 'quotaback', h)
    redis.call('HINCRBY', P .. 'providers', string.match(h, '^(%l+)%-'), -1)
    out[#out + 1] = h
  end
end
if #rows == 2 * limit then out[1] = rows[#rows] end
return out
