-- The pool at a glance, for the status page and /metrics, without a walk over the keys.
-- ARGV[4] mode:
--   "counts": ARGV[5..] families. Returns {now, keys, disabled keys, tokens (family,
--     tokens, ...), then per family: {active, locked, trial, lockout end (0: free or
--     no key)}, last the keys per hash prefix (prefix, keys, ...)}, read from the
--     selection indexes (ZCARD/ZCOUNT per family and index) over every index of the
--     family, and the counters kept by report.lua and add.lua.
--   "disabled": ARGV[5] SSCAN cursor, ARGV[6] count. Returns {next cursor,
--     {fams, revoked, over quota, hash}...} for one batch of the disabled keys.
local mode = ARGV[4]
if mode == 'disabled' then
  local scan = redis.call('SSCAN', P .. 'disabled', ARGV[5], 'COUNT', tonumber(ARGV[6]))
  local out = {scan[1]}
  for _, h in ipairs(scan[2]) do
    local r = redis.call('HMGET', P .. 'key:' .. h, 'fams', 'rev', 'oq')
    out[#out + 1] = {r[1] or '', r[2] or '0', r[3] or '0', h}
  end
  return out
end
local now = num(NOW)
local out = {
  now,
  redis.call('ZCARD', P .. 'order'),
  redis.call('SCARD', P .. 'disabled'),
  redis.call('HGETALL', P .. 'tokens'),
}
for i = 5, #ARGV do
  local f = ARGV[i]
  local active, locked, trial, first = 0, 0, 0, nil
  for _, index in ipairs(eligible(f, false, '', '')) do
    local c, x = index[1], index[2]
    local free, lock = P .. 'free:' .. f .. ':' .. x, P .. 'lock:' .. f .. ':' .. x
    -- A lock that has ended stays in the lock set until a Get moves it: free now.
    local n = redis.call('ZCARD', free) + redis.call('ZCOUNT', lock, '-inf', now)
    local m = redis.call('ZCOUNT', lock, '(' .. now, '+inf')
    active, locked = active + n, locked + m
    if c < 2 then trial = trial + n + m end
    if m > 0 then
      local top = redis.call('ZRANGEBYSCORE', lock, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
      local u = tonumber(top[2])
      if first == nil or u < first then first = u end
    end
  end
  local lockout = '0'
  if active == 0 and first ~= nil then lockout = num(first) end
  out[#out + 1] = {active, locked, trial, lockout}
end
out[#out + 1] = redis.call('HGETALL', P .. 'providers')
return out
