-- One key as the Key message shows it. ARGV[4] hash. Returns {"key", view} or {"missing"}.
if redis.call('EXISTS', P .. 'key:' .. ARGV[4]) == 0 then return {'missing'} end
return {'key', key_view(ARGV[4])}
