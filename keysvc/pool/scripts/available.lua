-- Available: keys not disabled.
return redis.call('ZCARD', P .. 'order') - redis.call('SCARD', P .. 'disabled')
