"""Lua scripts of the Redis store: each write is one atomic script (see redis.py for keys)."""

# Shared by the write scripts: bump the generation, log the event (bounded), publish it.
_ANNOUNCE = """
local p = ARGV[1]
local function announce(name, kind, version)
  local gen = redis.call('INCR', p .. ':gen')
  local event = cjson.encode({generation = gen, name = name, kind = kind,
                              version = version or cjson.null})
  redis.call('LPUSH', p .. ':log', event)
  redis.call('LTRIM', p .. ':log', 0, tonumber(ARGV[3]) - 1)
  redis.call('PUBLISH', p .. ':events', event)
end
redis.call('SET', p .. ':epoch', ARGV[4], 'NX')
"""

# ARGV: prefix, name, log_max, epoch, data, sha256, created_at, meta, activate
PUT = (
    _ANNOUNCE
    + """
local name = ARGV[2]
local v = redis.call('INCR', p .. ':seq:' .. name)
redis.call('HSET', p .. ':v:' .. name .. ':' .. v, 'data', ARGV[5], 'sha256', ARGV[6],
           'size', string.len(ARGV[5]), 'created_at', ARGV[7], 'meta', ARGV[8])
redis.call('ZADD', p .. ':vers:' .. name, v, v)
redis.call('SADD', p .. ':names', name)
announce(name, 'put', v)
if ARGV[9] == '1' then
  redis.call('SET', p .. ':cur:' .. name, v)
  announce(name, 'activate', v)
end
return v
"""
)

# ARGV: prefix, name, log_max, epoch, version, expected ('' = any). Returns {code, current}:
# 0 done, 1 conflict, 2 no such version, 3 no such name.
ACTIVATE = (
    _ANNOUNCE
    + """
local name, v = ARGV[2], tonumber(ARGV[5])
local cur = tonumber(redis.call('GET', p .. ':cur:' .. name) or '0')
if redis.call('SISMEMBER', p .. ':names', name) == 0 then return {3, cur} end
if redis.call('EXISTS', p .. ':v:' .. name .. ':' .. v) == 0 then return {2, cur} end
if ARGV[6] ~= '' and tonumber(ARGV[6]) ~= cur then return {1, cur} end
if cur ~= v then
  redis.call('SET', p .. ':cur:' .. name, v)
  announce(name, 'activate', v)
end
return {0, v}
"""
)

# ARGV: prefix, name, log_max, epoch. Returns 0 if there was no such name.
DELETE = (
    _ANNOUNCE
    + """
local name = ARGV[2]
if redis.call('SREM', p .. ':names', name) == 0 then return 0 end
for _, v in ipairs(redis.call('ZRANGE', p .. ':vers:' .. name, 0, -1)) do
  redis.call('UNLINK', p .. ':v:' .. name .. ':' .. v)
end
redis.call('DEL', p .. ':vers:' .. name, p .. ':cur:' .. name)
announce(name, 'delete', nil)
return 1
"""
)
