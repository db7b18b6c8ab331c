-- The key checker's lease: ARGV[4] the holder's id, ARGV[5] its length in ms.
-- Taken when free, renewed by its holder; returns 1 when ARGV[4] holds it now.
local lease = P .. 'checker'
local holder = redis.call('GET', lease)
if holder == false or holder == ARGV[4] then
  redis.call('SET', lease, ARGV[4], 'PX', tonumber(ARGV[5]))
  return 1
end
return 0
