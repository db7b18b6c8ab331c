-- Every report about one key, in one step: UpdateRateLimits ("update"), MarkRateLimited
-- ("mark"), ReportOutcome ("outcome"), IncrementUsage ("usage"). Headers come parsed.
-- ARGV: 4 hash, 5 "1" when a model was named, 6 its family, 7 mode, 8 "1" with headers,
-- 9-14 resets (requests, tokens; seconds as sent), remaining and limit of requests and
-- tokens ("" when absent), 15 "1" when the answer was a 429, 16 its error type,
-- 17 "1" to count the request, 18 its tokens, 19 the reason to disable it ("" not).
-- Returns {"key", first 429 since the hand-out "1"/"0", disable change, now, the
-- family counted, view} or {"missing"}.
local h, named, model_family, mode = ARGV[4], ARGV[5] == '1', ARGV[6], ARGV[7]
local r = record(h)
if r == nil then return {'missing'} end
local function opt(i) if ARGV[i] == '' then return nil end return tonumber(ARGV[i]) end
local parsed = nil
if ARGV[8] == '1' then
  parsed = {rr = opt(9), tr = opt(10), rmr = opt(11), rmt = opt(12), lmr = opt(13), lmt = opt(14)}
end

-- KeyPool._report_family: the family a report is for ("" key-wide), and whether it
-- ended a hand-out's reservation.
local function report_family(answer, limits)
  if named then
    local released = answer and release(reserved_key(model_family, h))
    return model_family, released
  end
  local answered_key = P .. 'answered:' .. h
  if not answer then
    local paired = redis.call('GET', answered_key)
    if paired then
      local pf, pt = string.match(paired, '^(.*) (%S+)$')
      if NOW < tonumber(pt) + REPORT_PAIR_WINDOW then return pf, false end
    end
  end
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
  local family, released = nil, false
  if matching ~= nil then oldest = matching end
  if oldest ~= nil then
    family = oldest
    released = answer and release(reserved_key(family, h))
  elseif latest ~= nil and NOW < latest_lu + ATTRIBUTION_WINDOW then
    family = latest
  else
    return '', false
  end
  if answer then redis.call('SET', answered_key, family .. ' ' .. num(NOW)) end
  return family, released
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

local first, change, counted = false, '', ''
if mode == 'usage' then
  counted = model_family
  count_usage(model_family, tonumber(ARGV[18]))
elseif mode == 'update' then
  if parsed ~= nil then
    local family = report_family(true, parsed)
    local s = state_table(family)
    apply_rate_headers(s, parsed, NOW, family == '')
    reposition(family, s)
  end
elseif mode == 'mark' then
  local family = report_family(false, nil)
  local s = state_table(family)
  first = mark(s, NOW, '')
  reposition(family, s)
else
  local rate_limited = ARGV[15] == '1'
  local family, released = report_family(true, parsed)
  if parsed ~= nil or rate_limited or released then
    local s = state_table(family)
    if parsed ~= nil then apply_rate_headers(s, parsed, NOW, family == '') end
    first = rate_limited and mark(s, NOW, ARGV[16])
    reposition(family, s)
  end
  if ARGV[17] == '1' then
    counted = family
    count_usage(family, tonumber(ARGV[18]))
  end
  if ARGV[19] ~= '' then change = disable_key(h, record(h), ARGV[19], NOW) end
end
-- A lock may have ended or got shorter: waiting Gets of every replica look again.
redis.call('PUBLISH', P .. 'wake', h)
return {'key', first and '1' or '0', change, num(NOW), counted, key_view(h)}
