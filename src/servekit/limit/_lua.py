"""The Redis store's Lua script: every limit of one key in one atomic round trip."""

from __future__ import annotations

import hashlib
from typing import Final

#: KEYS[1]: the key's hash (field per limit name -> full_at, seconds on the server's clock).
#: ARGV: mode (0 take, 1 peek, 2 adjust), n, then n names, n rates, n taus, n costs/deltas.
#: Returns {conforming, now, full_at...} with numbers as "%.17g" strings (Lua's tostring and
#: redis' number replies would round them).
SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mode = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local names = {}
for i = 1, n do names[i] = ARGV[2 + i] end
local old = redis.call('HMGET', KEYS[1], unpack(names))
local ok = 1
local out = {0, string.format('%.17g', now)}
local new = {}
local horizon = now
for i = 1, n do
  local f = tonumber(old[i]) or now
  local base = f
  if base < now then base = now end
  local nf = base + tonumber(ARGV[2 + 3 * n + i]) / tonumber(ARGV[2 + n + i])
  if mode ~= 2 and nf - now > tonumber(ARGV[2 + 2 * n + i]) then ok = 0 end
  new[i] = nf
  out[2 + i] = string.format('%.17g', f)
  if nf > horizon then horizon = nf end
end
out[1] = ok
if mode == 1 or ok == 0 then return out end
local fields = {}
for i = 1, n do
  fields[2 * i - 1] = names[i]
  fields[2 * i] = string.format('%.17g', new[i])
  out[2 + i] = fields[2 * i]
end
if horizon <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('PEXPIRE', KEYS[1], math.ceil((horizon - now) * 1000) + 1)
end
return out
"""

SHA1: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()

TAKE: Final = 0
PEEK: Final = 1
ADJUST: Final = 2
