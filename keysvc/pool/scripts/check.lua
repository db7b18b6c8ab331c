-- The key checker's results, each one step (KeyPool.apply_check / apply_dead_check).
-- ARGV: 4 hash, 5 "alive" or "dead", then for "alive": 6 the families, 7 "1" trial,
-- 8 "1" with an organization, 9 the organization, 10 the listing (a digest of the model
-- ids listed; "" when they could not be read: families and listing are kept), 11... the
-- model ids; for "dead": 6 the reason.
-- Returns {"key", disable change ("" none), "1" when revived, now, view} or {"missing"}.
local h = ARGV[4]
local r = record(h)
if r == nil then return {'missing'} end
local k = P .. 'key:' .. h
local change, revived = '', '0'
if ARGV[5] == 'alive' then
  local listing = ARGV[10]
  local fams = r.fams
  if listing ~= '' then fams = ARGV[6] end
  local c32 = '0'
  for _, f in ipairs(split(fams)) do if f == 'gpt4-32k' then c32 = '1' end end
  if fams ~= r.fams or ARGV[7] ~= r.trial or (listing ~= '' and listing ~= (r.ids or '')) then
    -- Another profile: out of the old indexes before it changes, into the new ones.
    if r.dis ~= '1' then unplace_all(r) end
    if listing ~= '' then set_listing(h, r, listing, {unpack(ARGV, 11)}) end
    redis.call('HSET', k, 'fams', fams, 'trial', ARGV[7], 'c32', c32)
    r = record(h)
    if r.dis ~= '1' then place_all(r, h, NOW) end
  end
  if ARGV[8] == '1' then redis.call('HSET', k, 'org', ARGV[9]) end
  redis.call('HSET', k, 'lc', num(NOW))
  if r.dis == '1' and r.revive == '1' then
    redis.call('HSET', k, 'dis', '0', 'rev', '0', 'oq', '0', 'dat', '0')
    redis.call('HDEL', k, 'reason', 'oqu')
    redis.call('SREM', P .. 'disabled', h)
    place_all(record(h), h, NOW)
    redis.call('PUBLISH', P .. 'wake', h)
    revived = '1'
  end
  redis.call('HSET', k, 'revive', '0')
else
  local reason = ARGV[6]
  redis.call('HSET', k, 'lc', num(NOW))
  if r.dis == '1' and r.revive == '1' then
    -- Still dead after a Recheck: the new verdict replaces the old one.
    redis.call('HSET', k, 'revive', '0', 'rev', reason == 'revoked' and '1' or '0',
      'oq', reason == 'quota' and '1' or '0', 'reason', reason)
  else
    change = disable_key(h, r, reason, NOW)
  end
end
return {'key', change, revived, num(NOW), key_view(h)}
