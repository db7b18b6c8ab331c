-- Adds keys not in the pool yet; a key already there keeps its state (a replica
-- starting or reconnecting never overwrites what the pool knows).
-- ARGV[4...]: per key: hash, families ("a,b" sorted), trial, has gpt4-32k, organization,
-- the hash of the key it is an organization clone of ("" none).
local added = {}
for i = 4, #ARGV, 6 do
  local h = ARGV[i]
  local k = P .. 'key:' .. h
  if redis.call('EXISTS', k) == 0 then
    local seq = redis.call('INCR', P .. 'seq')
    local m = string.format('%012d', seq) .. ':' .. h
    redis.call('HSET', k, 'seq', seq, 'm', m, 'fams', ARGV[i + 1], 'trial', ARGV[i + 2],
      'c32', ARGV[i + 3], 'org', ARGV[i + 4], 'clone', ARGV[i + 5], 'dis', '0', 'lu', '0',
      'pc', '0', 'lc', '0')
    redis.call('ZADD', P .. 'order', seq, h)
    -- Keys per provider, by the hash's prefix (oai, ant), for the census.
    redis.call('HINCRBY', P .. 'providers', string.match(h, '^(%l+)%-'), 1)
    place_all(record(h), h, NOW)
    added[#added + 1] = h
  end
end
if #added > 0 then redis.call('PUBLISH', P .. 'wake', '') end
return added
