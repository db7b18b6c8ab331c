-- The rules of keysvc/pool/rules.py, for the scripts of the Redis backend.
--
-- Every operation script is this file, then the constants block that
-- keysvc/pool/redis.py writes from rules.py (so the two cannot drift), then
-- the operation's own body: one script, one atomic call.
--
-- A (key, family) state is one Redis hash (STATE fields below); a value that is
-- not known (NaN in memory) is a field left out. Numbers are written with
-- %.17g: Lua's own tostring keeps 14 digits, and times must round-trip exactly.
-- The budget's left and refill rate are rounded to 4-byte floats as the memory
-- backend's columns keep them (struct.pack 'f'), so both backends compute alike.
--
-- A family whose provider limits input and output tokens apart (SPLIT, written from
-- the model table) keeps two more budgets, input and output tokens (rules.py's
-- split table); a state's s.sp says it is such a family's (set where the family is
-- known, never stored). Other states never get their fields, so the rules below
-- read as the two-budget ones for them.

local band, bor, bnot = bit.band, bit.bor, bit.bnot

local HAS_STATE, SAW_RATE_LIMIT, KIND_REQUESTS, KIND_TOKENS = 1, 2, 4, 8
local BUDGET_SHAPE = 16 + 32 + 64 + 128 + 1024 + 2048 + 4096 + 8192
local PROBATIONS = 16 + 32 + 1024 + 2048

-- The budget dimensions (requests, tokens; a split family's input and output tokens):
-- field names of left, rate, limit, full_at, Budget.empty_at's two values, and the
-- flag bits (keysvc.rates).
local DIMS = {
  {left = 'bl1', rate = 'rt1', limit = 'lm1', full = 'fa1', empty_at = 'ea1', empty_end = 'ee1', probation = 16, window = 64, kind = KIND_REQUESTS},
  {left = 'bl2', rate = 'rt2', limit = 'lm2', full = 'fa2', empty_at = 'ea2', empty_end = 'ee2', probation = 32, window = 128, kind = KIND_TOKENS},
  {left = 'bl3', rate = 'rt3', limit = 'lm3', full = 'fa3', empty_at = 'ea3', empty_end = 'ee3', probation = 1024, window = 4096, kind = KIND_INPUT_TOKENS},
  {left = 'bl4', rate = 'rt4', limit = 'lm4', full = 'fa4', empty_at = 'ea4', empty_end = 'ee4', probation = 2048, window = 8192, kind = KIND_OUTPUT_TOKENS},
}

-- Fields that are 0 when absent; every other field is nil (not known) when absent.
local ZERO_FIELDS = {lu = true, rla = true, ['until'] = true, bat = true, fa1 = true, fa2 = true, fa3 = true, fa4 = true, fl = true}
-- ... of which these are not stored while 0 (only a split family's state has them).
local SPARSE_ZERO = {fa3 = true, fa4 = true}
local STATE_FIELDS = {'lu', 'rla', 'until', 'rr', 'tr', 'rmr', 'rmt', 'bat', 'bl1', 'bl2', 'rt1', 'rt2', 'lm1', 'lm2', 'fa1', 'fa2', 'fl', 'bl3', 'bl4', 'rt3', 'rt4', 'lm3', 'lm4', 'fa3', 'fa4', 'pba'}
-- A dimension's reference on probation (rules._tell_shape): rarely there, so written
-- (or deleted) only by a state that has them or had them when read.
local EMPTY_FIELDS = {'ea1', 'ee1', 'ea2', 'ee2', 'ea3', 'ee3', 'ea4', 'ee4'}

local function num(x)
  return string.format('%.17g', x)
end

local function f32(x)
  return (struct.unpack('f', struct.pack('f', x)))
end

local function read_state(key)
  local raw = redis.call('HGETALL', key)
  local s = {}
  for i = 1, #raw, 2 do
    s[raw[i]] = tonumber(raw[i + 1])
  end
  for field in pairs(ZERO_FIELDS) do
    if s[field] == nil then s[field] = 0 end
  end
  for _, field in ipairs(EMPTY_FIELDS) do
    if s[field] ~= nil then s.had_empty = true end
  end
  return s
end

local function write_state(key, s)
  local set = {}
  local unset = {}
  local fields = STATE_FIELDS
  if s.had_empty or s.ea1 or s.ea2 or s.ea3 or s.ea4 then
    fields = {unpack(STATE_FIELDS)}
    for _, field in ipairs(EMPTY_FIELDS) do fields[#fields + 1] = field end
  end
  for _, field in ipairs(fields) do
    local v = s[field]
    if v == nil or (v == 0 and SPARSE_ZERO[field]) then
      unset[#unset + 1] = field
    else
      set[#set + 1] = field
      set[#set + 1] = num(v)
    end
  end
  if #unset > 0 then redis.call('HDEL', key, unpack(unset)) end
  redis.call('HSET', key, unpack(set))
end

-- Reservations: a list of "time tokens", oldest first; a hold (rules.Promise) is
-- "time tokens id", its id naming it for its caller's Get.
local function read_reserved(key)
  local out = {}
  for _, item in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local t, tokens, id = string.match(item, '^(%S+) (%S+) ?(%S*)$')
    out[#out + 1] = {tonumber(t), tonumber(tokens), id ~= '' and id or nil}
  end
  return out
end

local function write_reserved(key, reserved)
  redis.call('DEL', key)
  if #reserved > 0 then
    local items = {}
    for i, r in ipairs(reserved) do
      items[i] = num(r[1]) .. ' ' .. num(r[2]) .. (r[3] and (' ' .. r[3]) or '')
    end
    redis.call('RPUSH', key, unpack(items))
  end
end

-- rules.oldest_hand_out: the time of the list's oldest hand-out (holds aside), or nil.
local function oldest_hand_out(key)
  for _, item in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local t = string.match(item, '^(%S+) %S+$')
    if t then return tonumber(t) end
  end
  return nil
end

-- rules.release: ends the oldest hand-out's reservation (holds stay) and returns
-- when it was handed out; nil if none.
local function release(key)
  for _, item in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local t = string.match(item, '^(%S+) %S+$')
    if t then
      redis.call('LREM', key, 1, item)
      return tonumber(t)
    end
  end
  return nil
end

-- rules.window
local function window(s)
  local rr, tr, fl = s.rr, s.tr, s.fl
  if band(fl, SAW_RATE_LIMIT) ~= 0 then
    if band(fl, KIND_REQUESTS) ~= 0 then
      if s.rt1 ~= nil then return 0 end
      if rr ~= nil then return rr end
    elseif band(fl, KIND_TOKENS) ~= 0 then
      if s.rt2 ~= nil then return 0 end
      if tr ~= nil then return tr end
    elseif band(fl, bor(KIND_INPUT_TOKENS, KIND_OUTPUT_TOKENS)) ~= 0 then
      local rate = s.rt4
      if band(fl, KIND_INPUT_TOKENS) ~= 0 then rate = s.rt3 end
      if rate ~= nil then return 0 end
      if tr ~= nil then return tr end
    end
  elseif s.rmr ~= nil or s.rmt ~= nil then
    local w = 0
    if s.rmr == 0 and s.rt1 == nil then
      w = rr ~= nil and rr or RATE_LIMIT_FALLBACK
    end
    local rate = s.rt2
    -- rules._split_rate: a split family's tokens are left to input and output.
    if s.sp and rate == nil then
      rate = s.rt3
      if rate == nil then rate = s.rt4 end
    end
    if s.rmt == 0 and rate == nil then
      local reset = tr ~= nil and tr or RATE_LIMIT_FALLBACK
      if reset > w then w = reset end
    end
    return w
  end
  if rr ~= nil then
    if tr ~= nil and tr > rr then return tr end
    return rr
  end
  if tr ~= nil then return tr end
  if band(fl, SAW_RATE_LIMIT) ~= 0 then return RATE_LIMIT_FALLBACK end
  return 0
end

-- rules._refilled
local function refilled(s, d, at, now)
  local limit = s[d.limit]
  if now >= s[d.full] then return limit end
  return math.min(limit, s[d.left] + s[d.rate] * (now - at))
end

-- rules._reanchor
local function reanchor(s, now)
  local at = s.bat
  if at ~= 0 and at ~= now then
    for _, d in ipairs(DIMS) do
      if s[d.limit] ~= nil then s[d.left] = f32(refilled(s, d, at, now)) end
    end
  end
  s.bat = now
end

-- rules._end_probation
local function end_probation(s, d)
  s.fl = band(s.fl, bnot(d.probation))
  s[d.empty_at], s[d.empty_end] = nil, nil
  if band(s.fl, PROBATIONS) == 0 then s.pba = nil end
end

-- rules._forget_dimension
local function forget_dimension(s, d)
  s[d.left], s[d.rate], s[d.limit] = nil, nil, nil
  s[d.full] = 0
  s.fl = band(s.fl, bnot(d.window))
  end_probation(s, d)
end

-- rules.forget_budget
local function forget_budget(s)
  s.bat = 0
  s.fl = band(s.fl, bnot(BUDGET_SHAPE))
  for _, d in ipairs(DIMS) do
    s[d.left], s[d.rate], s[d.limit] = nil, nil, nil
    s[d.full] = 0
    s[d.empty_at], s[d.empty_end] = nil, nil
  end
  s.pba = nil
end

-- rules._tell_shape: on probation, an answer saying nothing is left tells a fixed
-- window (its refill's end stays put) from a token bucket (the end moves on).
local function tell_shape(s, d, now, full_at)
  local at = s[d.empty_at]
  if at == nil then
    s[d.empty_at], s[d.empty_end] = now, full_at
    return
  end
  local rate = s[d.rate]
  local elapsed = now - at
  if rate == nil or not (rate > 0) or elapsed <= 2.0 / rate + 4 * RESET_GRAIN then return end
  if full_at - s[d.empty_end] < elapsed / 2 then
    s.fl = bor(s.fl, d.window)
    s[d.rate] = 0
  else
    end_probation(s, d)
  end
end

-- rules.mark: a 429 of type kind ("" unknown) for a request handed out at answered
-- (nil: not known); true when the first since the hand-out.
local function mark(s, now, kind, answered)
  local fl = s.fl
  local first = band(fl, SAW_RATE_LIMIT) == 0
  if kind == '' and s.bat ~= 0 then
    if s.rmr == 0 and s.lm1 ~= nil then
      kind = 'requests'
    elseif s.rmt == 0 and s.lm2 ~= nil then
      kind = 'tokens'
    elseif s.sp and s.bl3 == 0 and s.lm3 ~= nil then
      kind = 'input_tokens'
    elseif s.sp and s.bl4 == 0 and s.lm4 ~= nil then
      kind = 'output_tokens'
    end
  end
  local kind_bit = 0
  if kind == 'requests' then kind_bit = KIND_REQUESTS elseif kind == 'tokens' then kind_bit = KIND_TOKENS end
  -- Input and output tokens are limits of their own in a split family only.
  if s.sp and kind == 'input_tokens' then kind_bit = KIND_INPUT_TOKENS end
  if s.sp and kind == 'output_tokens' then kind_bit = KIND_OUTPUT_TOKENS end
  s.fl = bor(band(fl, bor(HAS_STATE, BUDGET_SHAPE)), SAW_RATE_LIMIT, kind_bit)
  s.rla = now
  local d = DIMS[2]
  for _, dim in ipairs(DIMS) do
    if dim.kind == kind_bit then d = dim end
  end
  if kind_bit ~= 0 and s[d.limit] ~= nil then
    reanchor(s, now)
    s[d.left] = 0
    if band(s.fl, d.probation) == 0 then
      s.fl = bor(s.fl, d.probation)
      s.pba = now
    elseif answered == nil or answered > (s.pba or 0) then
      -- A request sent after the 429 that emptied the budget was refused too.
      s.fl = bor(s.fl, d.window)
      s[d.rate] = 0
    end
    if s[d.full] <= now then s[d.full] = now + RATE_LIMIT_FALLBACK end
  end
  return first
end

-- rules.apply_rate_headers; p: rr, tr (seconds as sent), rmr, rmt, lmr, lmt; a split
-- provider's input and output tokens ir, rmi, lmi and orr, rmo, lmo; ra the retry-after
-- (seconds); each nil when absent.
local function apply_rate_headers(s, p, now, wide)
  if p.rr ~= nil then s.rr = math.min(p.rr, MAX_RESET) end
  if p.tr ~= nil then s.tr = math.min(p.tr, MAX_RESET) end
  if p.ra ~= nil then
    -- The upstream said how long to wait: the window is at least that, unclamped.
    if not (s.rr ~= nil and s.rr >= p.ra) then s.rr = p.ra end
    if not (s.tr ~= nil and s.tr >= p.ra) then s.tr = p.ra end
  end
  local lefts = {p.rmr, p.rmt}
  for i = 1, 2 do
    if lefts[i] ~= nil then lefts[i] = math.min(lefts[i], MAX_COUNT) end
  end
  if lefts[1] ~= nil then s.rmr = lefts[1] end
  if lefts[2] ~= nil then s.rmt = lefts[2] end
  if wide then return end
  -- Each dimension: its budget, what is left, the limit and the reset the answer gave.
  local dims = {{DIMS[1], lefts[1], p.lmr, p.rr}, {DIMS[2], lefts[2], p.lmt, p.tr}}
  local split = s.sp and not (p.rmi == nil and p.rmo == nil)
  if split then
    -- The tokens dimension is then no budget of its own (rules.py).
    dims[2] = {DIMS[2], nil, nil, nil}
    local rmi, rmo = p.rmi, p.rmo
    if rmi ~= nil then rmi = math.min(rmi, MAX_COUNT) end
    if rmo ~= nil then rmo = math.min(rmo, MAX_COUNT) end
    dims[3] = {DIMS[3], rmi, p.lmi, p.ir}
    dims[4] = {DIMS[4], rmo, p.lmo, p.orr}
  elseif lefts[1] == nil and lefts[2] == nil then
    return
  end
  if s.bat ~= 0 then reanchor(s, now) end
  if split then forget_dimension(s, DIMS[2]) end
  for _, dim in ipairs(dims) do
    local d, left, limit, reset = dim[1], dim[2], dim[3], dim[4]
    if left ~= nil then
      local fresh = s[d.limit] == nil or now >= s[d.full]
      if limit ~= nil and reset ~= nil then
        limit = math.min(limit, MAX_COUNT)
        fresh = fresh or s[d.limit] ~= limit
        local refill = nil
        if reset > 0 and left < limit then refill = (limit - left) / reset end
        if fresh then
          end_probation(s, d)
          if refill ~= nil and band(s.fl, d.window) == 0 then s[d.rate] = f32(refill) else s[d.rate] = 0 end
        elseif refill ~= nil and s[d.rate] ~= nil and refill < s[d.rate] then
          s[d.rate] = f32(refill)
        end
        s[d.limit] = limit
        local full_at = now + math.min(reset, MAX_BUDGET_WAIT)
        if not fresh and left == 0 and reset <= MAX_BUDGET_WAIT
            and band(s.fl, bor(d.probation, d.window)) == d.probation then
          tell_shape(s, d, now, full_at)
        end
        -- Nor does an overtaken answer bring the end of the refill forward.
        if fresh or full_at > s[d.full] then s[d.full] = full_at end
      end
      if s[d.limit] ~= nil then
        -- Never more than the limit, whatever the header said (rules.py).
        local capped = math.min(left, s[d.limit])
        if fresh then s[d.left] = f32(capped) else s[d.left] = f32(math.min(capped, s[d.left])) end
        s.bat = now
      end
    end
  end
end

-- rules._limits_match (a state without a split family's budgets has no limit 3 or 4)
local function limits_match(s, p)
  local compared = false
  local limits = {p.lmr, p.lmt, p.lmi, p.lmo}
  for i, d in ipairs(DIMS) do
    local known = s[d.limit]
    if limits[i] ~= nil and known ~= nil then
      if math.min(limits[i], MAX_COUNT) ~= known then return false end
      compared = true
    end
  end
  return compared
end

-- rules._fits_at
local function fits_at(s, d, at, needed)
  local left = s[d.left]
  if needed <= left then return at end
  if needed > s[d.limit] then return math.huge end
  local rate = s[d.rate]
  if rate > 0 then return math.min(s[d.full], at + (needed - left) / rate) end
  return s[d.full]
end

-- rules.budget_until; split_needed: a split family's input and output tokens per
-- hand-out (nil elsewhere: such a state has no budget 3 or 4).
local function budget_until(s, reserved, tokens_needed, split_needed)
  local in_flight = #reserved
  local reserved_tokens = 0
  for _, r in ipairs(reserved) do reserved_tokens = reserved_tokens + r[2] end
  local at = s.bat
  local result = 0
  for i, d in ipairs(DIMS) do
    local limit, left = s[d.limit], s[d.left]
    if limit ~= nil then
      local needed
      if i == 1 then
        needed = in_flight + 1
      elseif i == 2 then
        needed = reserved_tokens + tokens_needed
      else -- each hand-out in flight needs as much as the next
        needed = (in_flight + 1) * split_needed[i - 2]
      end
      if needed > left then
        local fits = fits_at(s, d, at, needed)
        if in_flight > 0 then
          local lapsed = 0
          for _, r in ipairs(reserved) do
            local lapse = r[1] + RESERVATION_TTL
            if fits <= lapse then break end
            lapsed = lapse
            if i == 1 then
              needed = needed - 1
            elseif i == 2 then
              needed = needed - r[2]
            else
              needed = needed - split_needed[i - 2]
            end
            fits = fits_at(s, d, at, needed)
          end
          if lapsed > fits then fits = lapsed end
        end
        if fits > result then result = fits end
      end
    end
  end
  if result == 0 then return 0 end
  return math.min(result, at + MAX_BUDGET_WAIT)
end
