-- The Redis backend's data layout, shared by its operation scripts (after rules.lua).
--
-- Every key name starts with "{prefix}:" (one hash tag: one Cluster slot).
--   order          zset  key hash -> load position (seq)
--   seq            int   the last seq given out
--   key:<h>        hash  the key record: seq, m (index member), fams ("a,b" sorted),
--                        trial, c32 (has gpt4-32k), ids (its listing, absent or "" until
--                        the checker lists its model ids), dis, rev, oq, reason, dat, lc,
--                        pc, lu, org, clone, revive, oqu (over quota until; absent: a recheck)
--   disabled       set   hashes of disabled keys
--   free:<f>:<x>   zset  members free for family f (index x, below), by last use in f
--   lock:<f>:<x>   zset  members locked for f, by unlock time
--   lists:<f>      set   the indexes x "c:l" of family f that hold keys with a listing
--   ids:<l>        set   the model ids of listing l (l: a digest of them, from Python)
--   idsref         hash  listing -> how many keys have it (ids:<l> goes with the last)
--   st:<f>:<h>     hash  the (key, family) state (rules.lua); f "" is the key-wide one
--   rsv:<f>:<h>    list  hand-outs in flight, oldest first
--   fams:<h>       set   families the key has a state in
--   usage:<h>      hash  tokens counted per family
--   tokens         hash  family -> tokens counted by every key (census.lua reads it)
--   providers      hash  hash prefix (oai, ant) -> keys added (census.lua); a pool made
--                        before it was kept lacks the OpenAI keys added until then
--   tok            hash  family -> "mean variance" of finished requests' tokens
--   tokin, tokout  hash  the same of their input and of their output tokens (SPLIT families)
--   answered:<h>   -     "family time handed" of the last answer UpdateRateLimits reported
--                        (handed: its hand-out's time, "" not known); expires in a minute
--   held:<id>      set   the hashes of one key list (id: a digest of it); a replica with
--                        that list hands out only these keys and their organization clones
--   helds          set   the ids of the key lists held (sweep.lua forgets expired ones)
--   promise:<f>:<c> list  caller c's holds in family f, oldest first: "hash id"
--   idle:<c>       -     caller c's last hold lapsed unused: no more until its Get
--   promiseseq     int   the last hold id given out
--   quotaback      zset  hashes of keys over quota until a time the provider named, by
--                        that time (the record's oqu); back in service then (quota_back)
--   backoff:<p>    hash  provider p's overloads in a row (n) and its back-off's end (u)
-- Classes order selection: c = 0 trial, 1 trial with gpt4-32k, 2 paid, 3 paid with 32k.
-- Index x of a key: its class c while its model ids are not listed (any model of the
-- family); "c:l" once the checker listed them as l (the models of l only). Keys of one
-- index share a profile (families' class, listing), as the memory backend's groups.
-- An index member is the zero-padded seq, ':' and the hash, so ties go by load order.

local P = '{' .. ARGV[1] .. '}:'
local NOW
if ARGV[2] ~= '' then
  NOW = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local REUSE_DELAY = tonumber(ARGV[3])

local function split(text)
  local out = {}
  if text == nil or text == '' then return out end
  for part in string.gmatch(text, '[^,]+') do out[#out + 1] = part end
  return out
end

local function state_key(family, h) return P .. 'st:' .. family .. ':' .. h end
local function reserved_key(family, h) return P .. 'rsv:' .. family .. ':' .. h end

local function record(h)
  local raw = redis.call('HGETALL', P .. 'key:' .. h)
  if #raw == 0 then return nil end
  local r = {}
  for i = 1, #raw, 2 do r[raw[i]] = raw[i + 1] end
  return r
end

local function class_of(r)
  local c = r.trial == '1' and 0 or 2
  if r.c32 == '1' then c = c + 1 end
  return c
end

-- The index of key r in its families (see the layout), and whether it has a listing.
local function index_of(r)
  if r.ids ~= nil and r.ids ~= '' then return class_of(r) .. ':' .. r.ids, true end
  return tostring(class_of(r)), false
end

local function wide_until(h)
  local u = redis.call('HGET', state_key('', h), 'until')
  return u and tonumber(u) or 0
end

-- Places key h in the index of family f by its lock there (own, or a later key-wide one).
local function place(r, h, f, now)
  local x, listed = index_of(r)
  local s = redis.call('HMGET', state_key(f, h), 'until', 'lu')
  local lock_end = tonumber(s[1] or '0')
  local w = wide_until(h)
  if w > lock_end then lock_end = w end
  local free, lock = P .. 'free:' .. f .. ':' .. x, P .. 'lock:' .. f .. ':' .. x
  if listed then redis.call('SADD', P .. 'lists:' .. f, x) end
  if lock_end <= now then
    redis.call('ZREM', lock, r.m)
    redis.call('ZADD', free, num(tonumber(s[2] or '0')), r.m)
  else
    redis.call('ZREM', free, r.m)
    redis.call('ZADD', lock, num(lock_end), r.m)
  end
end

local function place_all(r, h, now)
  for _, f in ipairs(split(r.fams)) do place(r, h, f, now) end
end

local function unplace_all(r)
  local x, listed = index_of(r)
  for _, f in ipairs(split(r.fams)) do
    local free, lock = P .. 'free:' .. f .. ':' .. x, P .. 'lock:' .. f .. ':' .. x
    redis.call('ZREM', free, r.m)
    redis.call('ZREM', lock, r.m)
    -- An index without keys leaves the family's list: a Get looks at live ones only.
    if listed and redis.call('EXISTS', free, lock) == 0 then
      redis.call('SREM', P .. 'lists:' .. f, x)
    end
  end
end

-- Whether listing l has ``model``, or ``base`` (its name without a dated snapshot's
-- suffix, "" when it has none): keys.lists_model, with the suffix cut in Python.
local function lists_model(l, model, base)
  local ids = P .. 'ids:' .. l
  if redis.call('SISMEMBER', ids, model) == 1 then return true end
  return base ~= '' and redis.call('SISMEMBER', ids, base) == 1
end

-- The indexes of family f whose keys may serve ``model`` (KeyProfile.serves): {class,
-- index}. Every class's keys not listed yet, and the listed indexes whose listing has
-- the model; ``model`` "" asks about the family as a whole. Trial keys serve no
-- embeddings model.
local function eligible(f, embeddings, model, base)
  local out = {}
  for c = 0, 3 do
    if not (embeddings and c < 2) then out[#out + 1] = {c, tostring(c)} end
  end
  for _, x in ipairs(redis.call('SMEMBERS', P .. 'lists:' .. f)) do
    local c, l = string.match(x, '^(%d):(.+)$')
    c = tonumber(c)
    if not (embeddings and c < 2) and (model == '' or lists_model(l, model, base)) then
      out[#out + 1] = {c, x}
    end
  end
  return out
end

-- Gives key h (record r) the listing l of ``ids`` ("" none yet); the old one's ids go
-- when no key has it any more. The caller re-indexes the key.
local function set_listing(h, r, l, ids)
  local old = r.ids or ''
  if l == old then return end
  if l ~= '' then
    if #ids > 0 then redis.call('SADD', P .. 'ids:' .. l, unpack(ids)) end
    redis.call('HINCRBY', P .. 'idsref', l, 1)
  end
  if old ~= '' and redis.call('HINCRBY', P .. 'idsref', old, -1) <= 0 then
    redis.call('HDEL', P .. 'idsref', old)
    redis.call('DEL', P .. 'ids:' .. old)
  end
  redis.call('HSET', P .. 'key:' .. h, 'ids', l)
end

-- Whether this replica can hand out key h: the held set (HELD, a replica's key list) has
-- its hash or, for an organization clone, its parent's. HELD nil: every key.
local function holds(held, h)
  if held == nil or redis.call('SISMEMBER', held, h) == 1 then return true end
  local parent = redis.call('HGET', P .. 'key:' .. h, 'clone')
  return parent ~= false and parent ~= '' and redis.call('SISMEMBER', held, parent) == 1
end

-- The first member of zset z (from the head) that the replica holds, with its score, or
-- nil. At most SKIP_LIMIT members it lacks are looked past (keys only other replicas hold
-- sit at the heads when those do not hand them out); beyond them, none is.
local function first_held(z, held)
  local start = 0
  while start < SKIP_LIMIT do
    local rows = redis.call('ZRANGE', z, start, start + 31, 'WITHSCORES')
    for i = 1, #rows, 2 do
      if holds(held, string.sub(rows[i], 14)) then return rows[i], rows[i + 1] end
    end
    if #rows < 64 then return nil end
    start = start + 32
  end
  return nil
end

-- The best key for ``model`` of family f over the indexes eligible for it (eligible)
-- that the replica holds (held, see holds): {until (0: free now), member} or nil. Keys
-- whose lock has ended move to the free index first. Looks at the heads of the
-- eligible indexes only: their number grows with the profiles, not the keys.
local function select(f, embeddings, now, held, model, base)
  local best, best_rank = nil, nil
  for _, index in ipairs(eligible(f, embeddings, model, base)) do
    local c, x = index[1], index[2]
    do
      local free, lock = P .. 'free:' .. f .. ':' .. x, P .. 'lock:' .. f .. ':' .. x
      local due = redis.call('ZRANGEBYSCORE', lock, '-inf', num(now))
      for _, m in ipairs(due) do
        local h = string.sub(m, 14)
        local lu = redis.call('HGET', state_key(f, h), 'lu')
        redis.call('ZREM', lock, m)
        redis.call('ZADD', free, lu or '0', m)
      end
      local rank
      local m, score = first_held(free, held)
      if m ~= nil then
        rank = {0, c, tonumber(score), m}
      else
        m, score = first_held(lock, held)
        if m ~= nil then
          -- Keys unlocking at the same instant go by last use, then load order (as in
          -- memory); the set orders them by load order alone.
          for _, t in ipairs(redis.call('ZRANGEBYSCORE', lock, score, score)) do
            local h = string.sub(t, 14)
            if holds(held, h) then
              local lu = tonumber(redis.call('HGET', state_key(f, h), 'lu') or '0')
              if rank == nil or lu < rank[3] then rank = {tonumber(score), c, lu, t} end
            end
          end
        end
      end
      if rank ~= nil then
        local better = best_rank == nil
        if not better then
          for i = 1, 4 do
            if rank[i] ~= best_rank[i] then
              better = rank[i] < best_rank[i]
              break
            end
          end
        end
        if better then best, best_rank = {rank[1], rank[4]}, rank end
      end
    end
  end
  return best
end

-- Token reserve per hand-out (rules: mean + SPREAD standard deviations; 1 before any).
-- stats: the estimates' hash, 'tok' (all tokens) unless told ('tokin', 'tokout').
local function token_reserve(f, stats_of)
  local stats = redis.call('HGET', P .. (stats_of or 'tok'), f)
  if not stats then return 1.0 end
  local mean, variance = string.match(stats, '^(%S+) (%S+)$')
  return math.max(1.0, tonumber(mean) + TOKEN_ESTIMATE_SPREAD * math.sqrt(tonumber(variance)))
end

local function learn_tokens(f, tokens, stats_of)
  local stats_key = P .. (stats_of or 'tok')
  local stats = redis.call('HGET', stats_key, f)
  local mean, variance
  if not stats then
    mean, variance = tokens, 0.0
  else
    local m, v = string.match(stats, '^(%S+) (%S+)$')
    mean, variance = tonumber(m), tonumber(v)
    local delta = tokens - mean
    mean = mean + TOKEN_ESTIMATE_WEIGHT * delta
    variance = (1 - TOKEN_ESTIMATE_WEIGHT) * (variance + TOKEN_ESTIMATE_WEIGHT * delta * delta)
  end
  redis.call('HSET', stats_key, f, num(mean) .. ' ' .. num(variance))
end

-- rules: the lock of (h, f) from its inputs (KeyPool._derive); writes s.until.
local function derive(s, reserved, f, now)
  s.sp = SPLIT[f]
  while #reserved > 0 and reserved[1][1] + RESERVATION_TTL <= now do table.remove(reserved, 1) end
  local lu, rla, at = s.lu, s.rla, s.bat
  if at ~= 0 and now >= at + BUDGET_LAPSE then
    forget_budget(s)
    at = 0
  end
  if lu == 0 and rla == 0 and at == 0 then
    s['until'] = 0
    return
  end
  local u = 0
  if rla ~= 0 then u = rla + window(s) end
  if at ~= 0 then
    local split_needed = nil
    if s.sp then split_needed = {token_reserve(f, 'tokin'), token_reserve(f, 'tokout')} end
    local b = budget_until(s, reserved, token_reserve(f), split_needed)
    if b > u then u = b end
  elseif lu ~= 0 and lu + REUSE_DELAY > u then
    u = lu + REUSE_DELAY
  end
  s['until'] = u
end

-- Whether hold ``id`` on (f, h) still holds its room (rules.holds).
local function promise_stands(f, h, id, now)
  for _, r in ipairs(read_reserved(reserved_key(f, h))) do
    if r[3] == id then return r[1] + RESERVATION_TTL > now end
  end
  return false
end

-- KeyPool._drop_lapsed_holds: forgets caller's ended holds in f; true if there were.
local function drop_lapsed_holds(f, caller, now)
  local hk = P .. 'promise:' .. f .. ':' .. caller
  local lapsed = false
  while true do
    local item = redis.call('LINDEX', hk, 0)
    if not item then break end
    local h, id = string.match(item, '^(%S+) (%S+)$')
    if promise_stands(f, h, id, now) then break end
    redis.call('LPOP', hk)
    lapsed = true
  end
  return lapsed
end

-- Re-derives and re-places (h, f) after its reservations changed.
local function rederive(h, f, reserved, now)
  local sk = state_key(f, h)
  local s = read_state(sk)
  derive(s, reserved, f, now)
  write_state(sk, s)
  write_reserved(reserved_key(f, h), reserved)
  -- A key disabled since (its hold given back) stays out of the indexes.
  local r = record(h)
  if r.dis ~= '1' then place(r, h, f, now) end
end

-- KeyPool._hold: one request's room of (h, f) held for caller's next Get.
local function hold(f, h, caller, now)
  local id = tostring(redis.call('INCR', P .. 'promiseseq'))
  local reserved = read_reserved(reserved_key(f, h))
  local held = {now + PROMISE_TTL - RESERVATION_TTL, token_reserve(f), id}
  local at = 1
  while at <= #reserved and reserved[at][1] <= held[1] do at = at + 1 end
  table.insert(reserved, at, held)
  rederive(h, f, reserved, now)
  local hk = P .. 'promise:' .. f .. ':' .. caller
  redis.call('RPUSH', hk, h .. ' ' .. id)
  -- Every hold ends within PROMISE_TTL: the list outlives none of them by long.
  redis.call('PEXPIRE', hk, 60000)
end

-- KeyPool._redeem_hold: gives the room held longest for caller in f back.
local function redeem_hold(f, caller, now)
  redis.call('DEL', P .. 'idle:' .. caller)
  drop_lapsed_holds(f, caller, now)
  local item = redis.call('LPOP', P .. 'promise:' .. f .. ':' .. caller)
  if not item then return end
  local h, id = string.match(item, '^(%S+) (%S+)$')
  local reserved = read_reserved(reserved_key(f, h))
  for at, r in ipairs(reserved) do
    if r[3] == id then
      table.remove(reserved, at)
      rederive(h, f, reserved, now)
      return
    end
  end
end

-- What the Key message shows of key h: the record, each family state, the usage.
local function key_view(h)
  local out = {h}
  out[#out + 1] = redis.call('HMGET', P .. 'key:' .. h, unpack(RECORD_VIEW))
  local rows = {}
  local fams = redis.call('SMEMBERS', P .. 'fams:' .. h)
  if redis.call('EXISTS', state_key('', h)) == 1 then fams[#fams + 1] = '' end
  for _, f in ipairs(fams) do
    rows[#rows + 1] = f
    rows[#rows + 1] = redis.call('HMGET', state_key(f, h), unpack(STATE_VIEW))
  end
  out[#out + 1] = rows
  out[#out + 1] = redis.call('HGETALL', P .. 'usage:' .. h)
  return out
end

-- KeyPool.disable: returns the state change ("" when none: the key was already so).
local function disable_key(h, r, reason, now)
  local k = P .. 'key:' .. h
  redis.call('HSET', k, 'revive', '0')
  local change = ''
  if reason == 'revoked' then
    if r.rev ~= '1' then change = 'revoked' end
    redis.call('HSET', k, 'rev', '1')
  elseif reason == 'quota' then
    if r.oq ~= '1' then change = 'over_quota' end
    redis.call('HSET', k, 'oq', '1')
  elseif r.dis ~= '1' then
    change = 'disabled'
  end
  if r.dis == '1' then
    if r.reason == 'unspecified' then redis.call('HSET', k, 'reason', reason) end
  else
    redis.call('HSET', k, 'dis', '1', 'reason', reason, 'dat', num(now))
    redis.call('SADD', P .. 'disabled', h)
    unplace_all(r)
  end
  return change
end

-- KeyPool._quota_back: keys over quota until a time the provider named are in service
-- again once it has come (unless disabled for another reason since, or back already).
-- Memory sets a timer; here every script looks first, so none sees the key benched late.
local function quota_back(now)
  local due = redis.call('ZRANGEBYSCORE', P .. 'quotaback', '-inf', num(now), 'WITHSCORES')
  for i = 1, #due, 2 do
    local h, at = due[i], tonumber(due[i + 1])
    redis.call('ZREM', P .. 'quotaback', h)
    local r = record(h)
    if r ~= nil and tonumber(r.oqu or '0') == at and r.oq == '1' and r.rev ~= '1'
        and r.reason == 'quota' then
      local k = P .. 'key:' .. h
      redis.call('HSET', k, 'dis', '0', 'rev', '0', 'oq', '0', 'dat', '0')
      redis.call('HDEL', k, 'reason', 'oqu')
      redis.call('SREM', P .. 'disabled', h)
      place_all(record(h), h, at)
      redis.call('PUBLISH', P .. 'wake', h)
    end
  end
end

quota_back(NOW)
