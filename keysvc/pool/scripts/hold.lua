-- A replica's key list, in batches: ARGV[4] its id, ARGV[5] the time it is kept without
-- being renewed (ms), ARGV[6...] hashes to add to it. With no hashes, renews it; returns
-- whether it exists (a list of no keys never does).
local held = P .. 'held:' .. ARGV[4]
-- Every list ever held, for sweep.lua (which forgets those expired).
redis.call('SADD', P .. 'helds', ARGV[4])
if #ARGV >= 6 then redis.call('SADD', held, unpack(ARGV, 6)) end
return redis.call('PEXPIRE', held, ARGV[5])
