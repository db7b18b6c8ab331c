-- Get: select, throttle and reserve in one step (KeyPool.get / _hand_out).
-- ARGV[4] family, ARGV[5] "1" for an embeddings model, ARGV[6] mode:
--   "get": hand out the best key, free or first to unlock;
--   "free": hand it out only if it is free now (a waiting Get);
--   "peek": hand out nothing (GetLockoutPeriod); a free key with a known budget is
--   held for the caller (KeyPool.lockout_period).
-- ARGV[7] the id of the replica's key list: only keys of its held set are chosen.
-- ARGV[8] the caller ("" none): a Get first takes back the room held for it longest.
-- ARGV[9] the model, ARGV[10] its name without a dated snapshot's suffix ("" when it has
-- none): keys whose listed model ids lack both are not chosen.
-- Returns {"key", now, view}, {"until", unlock time, now} or {"none"}.
local f, embeddings, mode, caller = ARGV[4], ARGV[5] == '1', ARGV[6], ARGV[8]
local idle = caller ~= '' and P .. 'idle:' .. caller
if caller ~= '' and mode == 'peek' then
  if drop_lapsed_holds(f, caller, NOW) then redis.call('SET', idle, '1', 'EX', 3600) end
elseif caller ~= '' then
  redeem_hold(f, caller, NOW)
end
local best = select(f, embeddings, NOW, P .. 'held:' .. ARGV[7], ARGV[9], ARGV[10])
if best == nil then return {'none'} end
if mode == 'peek' or (mode == 'free' and best[1] > NOW) then
  if mode == 'peek' and caller ~= '' and best[1] <= NOW then
    local h = string.sub(best[2], 14)
    local at = redis.call('HGET', state_key(f, h), 'bat')
    -- Before a budget is known, the reuse throttle keeps callers apart already.
    if at and tonumber(at) ~= 0 and redis.call('EXISTS', idle) == 0 then
      hold(f, h, caller, NOW)
    end
  end
  return {'until', num(best[1]), num(NOW)}
end
local h = string.sub(best[2], 14)
local r = record(h)
local sk, rk = state_key(f, h), reserved_key(f, h)
local s = read_state(sk)
s.lu, s.rla = NOW, NOW
-- The previous answer's headers are spent; the coming answer brings its own.
s.rr, s.tr, s.rmr, s.rmt = nil, nil, nil, nil
s.fl = bor(HAS_STATE, band(s.fl, BUDGET_SHAPE))
local reserved = read_reserved(rk)
reserved[#reserved + 1] = {NOW, token_reserve(f)}
derive(s, reserved, f, NOW)
write_state(sk, s)
write_reserved(rk, reserved)
redis.call('SADD', P .. 'fams:' .. h, f)
redis.call('HSET', P .. 'key:' .. h, 'lu', num(NOW))
local wide = state_key('', h)
if redis.call('EXISTS', wide) == 1 then
  -- Key-wide reports describe answers before this hand-out, as in the seed.
  redis.call('DEL', wide, reserved_key('', h))
  place_all(r, h, NOW)
else
  place(r, h, f, NOW)
end
return {'key', num(NOW), key_view(h)}
