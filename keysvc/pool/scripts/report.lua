-- Every report about one key, in one step: UpdateRateLimits ("update"), MarkRateLimited
-- ("mark"), ReportOutcome ("outcome"), IncrementUsage ("usage"). Headers come parsed.
-- ARGV: 4 hash, 5 "1" when a model was named, 6 its family, 7 mode, 8 "1" with headers,
-- 9-14 resets (requests, tokens; seconds as sent), remaining and limit of requests and
-- tokens ("" when absent), 15 "1" when the answer was a 429, 16 its error type,
-- 17 "1" to count the request, 18 its tokens, 19 the reason to disable it ("" not);
-- 20-25 a split provider's input and output tokens: reset, remaining, limit each;
-- 26 retry-after (seconds); 27 the time the resets were read at, when the provider
-- sends times (they are seconds from then; "" for durations); 28 and 29 the request's
-- input and output tokens; 30 the key's provider; 31 "overloaded" (the provider said
-- so), "succeeded" (a 2xx) or ""; 32 "1" when the key may not use the family; 33 with
-- reason "quota", the time the provider named for it to come back ("" none).
-- Returns {"key", first 429 since the hand-out "1"/"0", disable change, now, the
-- family counted, view, the provider's back-off (seconds, "" none), the family the key
-- was taken out of ("" none)} or {"missing"}.
local h, named, model_family, mode = ARGV[4], ARGV[5] == '1', ARGV[6], ARGV[7]
-- What UpdateRateLimits last reported for the key, for a MarkRateLimited to pair with.
local answered_key = P .. 'answered:' .. h
local r = record(h)
if r == nil then return {'missing'} end
local function opt(i) if ARGV[i] == '' then return nil end return tonumber(ARGV[i]) end
local parsed = nil
if ARGV[8] == '1' then
  parsed = {rr = opt(9), tr = opt(10), rmr = opt(11), rmt = opt(12), lmr = opt(13), lmt = opt(14),
    ir = opt(20), rmi = opt(21), lmi = opt(22), orr = opt(23), rmo = opt(24), lmo = opt(25),
    ra = opt(26)}
  local read_at = opt(27)
  if read_at ~= nil and read_at ~= NOW then
    -- Resets are times the provider named: seconds from Redis's now, not the replica's.
    for _, field in ipairs({'rr', 'tr', 'ir', 'orr'}) do
      if parsed[field] ~= nil then parsed[field] = math.max(0, parsed[field] + read_at - NOW) end
    end
  end
end

-- KeyPool._report_family: the family a report is for ("" key-wide), and when the
-- hand-out it answers was made (nil: not known); an answer ends its reservation.
local function report_family(answer, limits)
  if not answer then
    local paired = redis.call('GET', answered_key)
    if paired then
      local pf, pt, ph = string.match(paired, '^(.*) (%S+) (%S*)$')
      if pf ~= nil and NOW < tonumber(pt) + REPORT_PAIR_WINDOW and (not named or pf == model_family) then
        return pf, tonumber(ph)
      end
    end
  end
  local family, handed = model_family, nil
  if named then
    local rk = reserved_key(model_family, h)
    if answer then handed = release(rk) else handed = oldest_hand_out(rk) end
  else
    local fams = redis.call('SMEMBERS', P .. 'fams:' .. h)
    table.sort(fams)
    local oldest, oldest_t, matching, matching_t, latest, latest_lu = nil, 0, nil, 0, nil, 0
    for _, f in ipairs(fams) do
      local t = oldest_hand_out(reserved_key(f, h))
      local s = nil
      if t then
        if oldest == nil or t < oldest_t then oldest, oldest_t = f, t end
        if limits ~= nil then
          s = read_state(state_key(f, h))
          if limits_match(s, limits) and (matching == nil or t < matching_t) then
            matching, matching_t = f, t
          end
        end
      end
      local lu = tonumber(redis.call('HGET', state_key(f, h), 'lu') or '0')
      if lu ~= 0 and (latest == nil or lu > latest_lu) then latest, latest_lu = f, lu end
    end
    if matching ~= nil then oldest, oldest_t = matching, matching_t end
    if oldest ~= nil then
      family = oldest
      if answer then handed = release(reserved_key(family, h)) else handed = oldest_t end
    elseif latest ~= nil and NOW < latest_lu + ATTRIBUTION_WINDOW then
      family = latest
    else
      return '', nil
    end
  end
  return family, handed
end

-- KeyPool._state_table: the state a report about family changes; it exists from now on.
local function state_table(family)
  local sk = state_key(family, h)
  local s = read_state(sk)
  if family == '' then
    if band(s.fl, HAS_STATE) == 0 then
      s.fl = HAS_STATE
      s.rla = tonumber(r.lu)
    end
  else
    redis.call('SADD', P .. 'fams:' .. h, family)
    s.fl = bor(s.fl, HAS_STATE)
  end
  s.sp = SPLIT[family]
  return s
end

-- KeyPool._reposition: the lock re-derived, the key re-placed where it matters.
local function reposition(family, s)
  local reserved = read_reserved(reserved_key(family, h))
  derive(s, reserved, family, NOW)
  write_state(state_key(family, h), s)
  write_reserved(reserved_key(family, h), reserved)
  if r.dis ~= '1' then
    if family == '' then
      place_all(r, h, NOW)
    else
      for _, f in ipairs(split(r.fams)) do
        if f == family then place(r, h, f, NOW) end
      end
    end
  end
end

local function count_usage(family, tokens)
  if family ~= '' then
    redis.call('HINCRBY', P .. 'usage:' .. h, family, tokens)
    -- The pool's sum per family, for the status page and /metrics (census.lua).
    redis.call('HINCRBY', P .. 'tokens', family, tokens)
    if tokens > 0 then learn_tokens(family, tokens) end
  end
  redis.call('HINCRBY', P .. 'key:' .. h, 'pc', 1)
end

-- ProviderBackoff.overloaded (keysvc/providers/backoff.py), one for every replica: the
-- seconds from now until the provider's back-off ends.
local function overloaded(provider, asked)
  local bk = P .. 'backoff:' .. provider
  local overloads = redis.call('HINCRBY', bk, 'n', 1)
  local wait = math.min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ^ math.min(overloads - 1, 32))
  if asked ~= nil and asked > wait then wait = math.min(asked, BACKOFF_MAX) end
  local ends = tonumber(redis.call('HGET', bk, 'u') or '0')
  if NOW + wait > ends then ends = NOW + wait end
  redis.call('HSET', bk, 'u', num(ends))
  return ends - NOW
end

-- KeyPool._deny_family: the key leaves the family only (its state there is kept).
local function deny_family(family)
  local rec = record(h)
  local kept, had = {}, false
  for _, f in ipairs(split(rec.fams)) do
    if f == family then had = true else kept[#kept + 1] = f end
  end
  if not had then return false end
  if rec.dis ~= '1' then unplace_all(rec) end
  local c32 = '0'
  for _, f in ipairs(kept) do if f == 'gpt4-32k' then c32 = '1' end end
  redis.call('HSET', P .. 'key:' .. h, 'fams', table.concat(kept, ','), 'c32', c32)
  rec = record(h)
  if rec.dis ~= '1' then place_all(rec, h, NOW) end
  return true
end

local first, change, counted, backoff, denied = false, '', '', '', ''
if mode == 'usage' then
  counted = model_family
  count_usage(model_family, tonumber(ARGV[18]))
elseif mode == 'update' then
  if parsed ~= nil then
    local family, answered = report_family(true, parsed)
    if family ~= '' then
      -- KeyPool._pair: for the MarkRateLimited that may follow (kept a minute: only
      -- REPORT_PAIR_WINDOW of it is used).
      local pair = family .. ' ' .. num(NOW) .. ' ' .. (answered and num(answered) or '')
      redis.call('SET', answered_key, pair, 'EX', 60)
    end
    local s = state_table(family)
    apply_rate_headers(s, parsed, NOW, family == '')
    reposition(family, s)
  end
elseif mode == 'mark' then
  local family, answered = report_family(false, nil)
  local s = state_table(family)
  first = mark(s, NOW, '', answered)
  reposition(family, s)
else
  local rate_limited = ARGV[15] == '1'
  local family, answered = report_family(true, parsed)
  if parsed ~= nil or rate_limited or answered ~= nil then
    local s = state_table(family)
    if parsed ~= nil then apply_rate_headers(s, parsed, NOW, family == '') end
    first = rate_limited and mark(s, NOW, ARGV[16], answered)
    reposition(family, s)
  end
  if ARGV[17] == '1' then
    counted = family
    count_usage(family, tonumber(ARGV[18]))
    local input, output = tonumber(ARGV[28]), tonumber(ARGV[29])
    if SPLIT[family] and input + output > 0 then
      learn_tokens(family, input, 'tokin')
      learn_tokens(family, output, 'tokout')
    end
  end
  if ARGV[31] == 'overloaded' then
    backoff = num(overloaded(ARGV[30], parsed and parsed.ra))
  elseif ARGV[31] == 'succeeded' then
    redis.call('DEL', P .. 'backoff:' .. ARGV[30])
  end
  if ARGV[32] == '1' and family ~= '' and deny_family(family) then denied = family end
  if ARGV[19] ~= '' then
    if ARGV[19] == 'quota' and ARGV[33] ~= '' then
      -- KeyPool.disable: the named time, when later than one known, brings it back then.
      local back = tonumber(ARGV[33])
      if back > tonumber(record(h).oqu or '0') then
        redis.call('HSET', P .. 'key:' .. h, 'oqu', num(back))
        redis.call('ZADD', P .. 'quotaback', num(back), h)
      end
    end
    change = disable_key(h, record(h), ARGV[19], NOW)
  end
end
-- A lock may have ended or got shorter: waiting Gets of every replica look again.
redis.call('PUBLISH', P .. 'wake', h)
return {'key', first and '1' or '0', change, num(NOW), counted, key_view(h), backoff, denied}
