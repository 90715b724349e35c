"""The Redis store's Lua script: every limit of one key in one atomic round trip.

Lean by design (it runs on Redis' single thread for every decision): three ``redis.call``s
(``TIME``, ``HMGET``, then ``HSET`` + ``PEXPIRE`` only when something is charged), numbers in
microseconds on the server's clock, state and arguments as packed little-endian doubles (no
number formatting or parsing), and an integer array as the reply.
"""

from __future__ import annotations

import hashlib
from typing import Final

#: KEYS[1]: the key's hash: one field per limit name -> ``full_at`` (µs, packed ``<d``).
#: ARGV[1]: mode ("0" take, "1" peek, "2" adjust); ARGV[2]: costs (or deltas), ``<d`` per limit;
#: ARGV[3]: per limit ``<dd`` (µs per token, admission threshold on the debt in µs);
#: ARGV[4..]: the limits' names.
#: Returns ``{conforming, now_us, debt_us...}``: integers; each debt is ``full_at - now``
#: (after the operation when it charged, before otherwise) rounded up to a whole µs.
SCRIPT: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local mode = ARGV[1]
local costs = ARGV[2]
local spec = ARGV[3]
local n = #ARGV - 3
local old = redis.call('HMGET', KEYS[1], unpack(ARGV, 4))
local out = {1, now}
local new = {}
local horizon = now
for i = 1, n do
  local f = old[i]
  if f then f = struct.unpack('<d', f) else f = now end
  local base = f
  if base < now then base = now end
  local per, tau = struct.unpack('<dd', spec, 16 * i - 15)
  local nf = base + struct.unpack('<d', costs, 8 * i - 7) * per
  if nf - now > tau and mode ~= '2' then out[1] = 0 end
  new[i] = nf
  out[2 + i] = math.ceil(f - now)
  if nf > horizon then horizon = nf end
end
if mode == '1' or out[1] == 0 then return out end
if horizon <= now then
  redis.call('DEL', KEYS[1])
  for i = 1, n do out[2 + i] = math.ceil(new[i] - now) end
  return out
end
local fields = {}
for i = 1, n do
  fields[2 * i - 1] = ARGV[3 + i]
  fields[2 * i] = struct.pack('<d', new[i])
  out[2 + i] = math.ceil(new[i] - now)
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], math.ceil((horizon - now) / 1000) + 1)
return out
"""

SHA1: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()

TAKE: Final = 0
PEEK: Final = 1
ADJUST: Final = 2
