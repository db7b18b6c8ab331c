-- A lease among the replicas: ARGV[4] the holder's id, ARGV[5] its length in ms, ARGV[6]
-- its name ("checker": the key checker's; "sweeper": the sweep of keys no replica holds).
-- Taken when free, renewed by its holder; returns 1 when ARGV[4] holds it now.
local lease = P .. ARGV[6]
local holder = redis.call('GET', lease)
if holder == false or holder == ARGV[4] then
  redis.call('SET', lease, ARGV[4], 'PX', tonumber(ARGV[5]))
  return 1
end
return 0
