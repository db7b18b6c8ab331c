-- Disable. ARGV[4] hash, ARGV[5] reason. Returns {"key", change, now, view} or {"missing"}.
local h = ARGV[4]
local r = record(h)
if r == nil then return {'missing'} end
local change = disable_key(h, r, ARGV[5], NOW)
return {'key', change, num(NOW), key_view(h)}
