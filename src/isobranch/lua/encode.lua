-- Lua values -> Python marshal bytes, for isobranch's sandbox (loaded like
-- decode.lua, the first time a VM encodes a table). Returns encode(value).
local lib = ...
local type, next, error, tostring, pcall = lib.type, lib.next, lib.error, lib.tostring, lib.pcall
local rawget, rawlen, setmetatable = lib.rawget, lib.rawlen, lib.setmetatable
local math_type, format = lib.math_type, lib.format
local concat, pack_string = lib.concat, lib.pack_string
local CONVERT = lib.CONVERT
-- Conversion runs without the count hook (sandbox.lua's unhooked), so it
-- looks at the clock itself, every TICK pieces of output (each value
-- writes at least one): check_time raises the timeout once a call's
-- deadline has passed. Counting with the output's own count costs one
-- comparison per value.
local check_time = lib.check_time
local TICK <const> = 1024
-- Lazily filled states (lazy.lua): each is filled before it is encoded.
local LAZY, fill_lazy = lib.LAZY, lib.fill_lazy
-- convert.py's MAX_DEPTH and the reason it gives (decode.lua has the same).
local MAX_DEPTH, DEPTH_REASON = lib.MAX_DEPTH, lib.DEPTH_REASON
local PATH_KEYS_SHOWN = 8
-- Cycle detection: a table is compared with its ancestors up to this depth
-- (a few comparisons for the shallow tables most data is made of, and no
-- hash table written and cleared per table); deeper ancestors are kept in
-- a set as well, so a check never costs more than SCAN_DEPTH comparisons.
local SCAN_DEPTH <const> = 16
local CYCLE = "cycle (a table that contains itself)"
-- Which Python container a decoded table came from (see decode.lua).
local KIND = lib.KIND
local B_INT <const>, B_LONG <const>, B_FLOAT <const>, B_UNICODE <const> = 105, 108, 103, 117
local B_LIST <const>, B_REF <const>, FLAG_REF <const> = 91, 114, 128

local INT32_MIN, INT32_MAX = -2147483648, 2147483647
-- The pieces written so far are joined into one chunk once a table ends
-- with at least this many of them: `out` then stays small and is reused
-- (a 20k-item result is ~340k pieces; one table that size, grown by
-- doubling, cost more in resizing and fresh memory than joining twice).
local FLUSH_AT <const> = 4096
-- Raised when a list written in one pass turns out not to be a sequence
-- after part of it was already joined into a chunk: encode() then starts
-- again without writing lists in one pass.
local RESTART = {}

local function long_bytes(v)
  -- Python's 'l' marshal type: a signed count of base-2^15 digits. Work on
  -- the non-positive value so that math.mininteger cannot overflow.
  local negative = v < 0
  local rest = negative and v or -v
  local parts, count = {""}, 0
  while rest ~= 0 do
    local digit = -(rest % -32768)
    count = count + 1
    parts[count + 1] = pack_string("<I2", digit)
    rest = (rest + digit) // 32768
  end
  parts[1] = pack_string("<Bi4", B_LONG, negative and -count or count)
  return concat(parts)
end

-- Memo tables: prefixes and small integers repeat, and string.pack is the
-- slowest step of encoding. They live as long as the VM, so each holds only
-- small numbers (below MEMO_LIMIT): a weak table would not bound them, since
-- Lua never removes strings from weak tables.
local MEMO_LIMIT <const> = 1024
local function memo(build)
  return setmetatable({}, {__index = function(cache, number)
    local value = build(number)
    if number < MEMO_LIMIT then cache[number] = value end
    return value
  end})
end
local STRING_PREFIX = memo(function(size) return pack_string("<Bi4", B_UNICODE, size) end)
local LIST_PREFIX = memo(function(size) return pack_string("<Bi4", B_LIST, size) end)
local INT_BYTES = memo(function(v) return pack_string("<Bi4", B_INT, v) end)
local REF_BYTES = memo(function(index) return pack_string("<Bi4", B_REF, index) end)

local function key_text(k)
  if type(k) == "string" then return "['" .. k .. "']" end
  return "[" .. tostring(k) .. "]"
end

local function encode_pass(value, one_pass)
  local out = {}
  -- Joined pieces (see FLUSH_AT).
  local chunks, chunk_count = {}, 0
  -- When the output reaches this many pieces, look at the clock.
  local check_at = TICK
  -- The tables being written, by depth (ancestors[1] is the root), and the
  -- key each one sits under; deeper than SCAN_DEPTH they are in `visiting`.
  local ancestors, visiting = {}, {}
  local keys, depth = {}, 0
  -- String key -> the back reference to it in this result (its index is
  -- 0-based, as Python counts), looked up once per dict entry.
  local key_refs, ref_count, ref_keys = {}, 0, {}

  local function fail(key, message)
    local parts = {}
    for i = 1, depth do
      if keys[i] ~= nil then parts[#parts + 1] = key_text(keys[i]) end
    end
    if key ~= nil then parts[#parts + 1] = key_text(key) end
    local path = concat(parts)
    if #parts > PATH_KEYS_SHOWN then
      -- Like convert.key_path: the ends of a long path, and how much is left out.
      local head, tail = PATH_KEYS_SHOWN // 2, PATH_KEYS_SHOWN // 2 - 1
      path = concat(parts, "", 1, head) .. format("...(%d more)...", #parts - head - tail)
        .. concat(parts, "", #parts - tail + 1, #parts)
    end
    error(CONVERT .. "result" .. path .. ": " .. message, 0)
  end

  local enc

  -- Speed: the scalar types JSON-like data is made of are written inline
  -- (SCALAR below, the same in both loops); only tables and rare values
  -- go through enc(). Both take and return n, the count of pieces in out:
  -- as a local (and out as one), each write is a third of the
  -- instructions an upvalue costs.
  local function enc_table(t, key, n)
    local out = out
    if depth < SCAN_DEPTH then
      for i = 1, depth do if ancestors[i] == t then fail(key, CYCLE) end end
    else
      for i = 1, SCAN_DEPTH do if ancestors[i] == t then fail(key, CYCLE) end end
      if visiting[t] then fail(key, CYCLE) end
    end
    if LAZY[t] then fill_lazy(t) end
    depth = depth + 1
    ancestors[depth] = t
    keys[depth] = key
    if depth > SCAN_DEPTH then visiting[t] = true end
    if depth > MAX_DEPTH then fail(nil, DEPTH_REASON) end
    local kind = KIND[t]
    local list = kind
    if kind == nil then list = rawlen(t) > 0 end
    if list and one_pass then
      -- One pass when next gives exactly 1, 2, ..., n in order (a sequence
      -- in the array part, the usual case); else the output is dropped and
      -- the checks below decide. The length is written first: a sequence's
      -- is rawlen's (its only border).
      local start, expected, refs_before, chunks_before = n, 1, ref_count, chunk_count
      local length = rawlen(t)
      if math_type(kind) == "integer" and kind > length then length = kind end
      n = n + 1; out[n] = LIST_PREFIX[length]
      for k, v in next, t do
        if k ~= expected then list = nil; break end
        if n >= check_at then check_at = n + TICK; check_time() end
        expected = expected + 1
        local kind_v = type(v)                                          -- SCALAR
        if kind_v == "string" then
          n = n + 2; out[n - 1] = STRING_PREFIX[#v]; out[n] = v
        elseif kind_v == "number" then
          n = n + 1
          if math_type(v) == "float" then out[n] = pack_string("<Bd", B_FLOAT, v)
          elseif v >= 0 and v < 1024 then out[n] = INT_BYTES[v]
          elseif v >= INT32_MIN and v <= INT32_MAX then out[n] = pack_string("<Bi4", B_INT, v)
          else out[n] = long_bytes(v) end
        elseif kind_v == "boolean" then
          n = n + 1; out[n] = v and "T" or "F"
        elseif kind_v == "table" then
          n = enc_table(v, k, n)
        else
          n = enc(v, k, n)
        end
      end
      if list then
        for _ = expected, length do n = n + 1; out[n] = "N" end
        if depth > SCAN_DEPTH then visiting[t] = nil end
        depth = depth - 1
        if n >= FLUSH_AT then
          chunk_count = chunk_count + 1; chunks[chunk_count] = concat(out, "", 1, n); n = 0
          check_at = TICK
        end
        return n
      end
      -- Part of the output is already joined: start again (rare: a large
      -- table that is not a sequence, or one met just after a join).
      if chunk_count ~= chunks_before then error(RESTART, 0) end
      -- Dropped output: keys first written in it must be written again.
      n = start
      check_at = n + TICK
      for i = ref_count, refs_before + 1, -1 do key_refs[ref_keys[i]] = nil end
      ref_count = refs_before
      list = true
    end
    -- Only a list needs its length: a dict (most tables here) skips the call.
    local length = list and rawlen(t)
    if list then
      -- A list only if every key is an integer 1..n (a marked list may
      -- also declare a longer length, for a tail of None).
      local max_int = 0
      for k in next, t do
        if math_type(k) ~= "integer" or k < 1 then list = false; break end
        if k > max_int then max_int = k end
      end
      if list then
        if kind == nil and max_int ~= length then
          list = false
        else
          if math_type(kind) == "integer" and kind > max_int then max_int = kind end
          length = max_int
        end
      end
    end
    if list then
      n = n + 1; out[n] = LIST_PREFIX[length]
      for i = 1, length do
        local v = rawget(t, i)
        if n >= check_at then check_at = n + TICK; check_time() end
        if v == nil then n = n + 1; out[n] = "N" else n = enc(v, i, n) end
      end
    else
      n = n + 1; out[n] = "{"
      for k, v in next, t do
        if n >= check_at then check_at = n + TICK; check_time() end
        local ref = key_refs[k]
        if ref then
          n = n + 1; out[n] = ref
        elseif type(k) == "string" then
          -- Written once per result, flagged so that Python keeps a reference
          -- to it; later entries write a back reference ('r' and its index):
          -- Python then makes one str per distinct key, not one per entry.
          n = n + 1; out[n] = pack_string("<Bs4", B_UNICODE + FLAG_REF, k)
          key_refs[k] = REF_BYTES[ref_count]; ref_count = ref_count + 1; ref_keys[ref_count] = k
        elseif type(k) == "table" then
          fail(k, "a table cannot be a Python dict key")
        else
          n = enc(k, k, n)
        end
        local kind_v = type(v)                                          -- SCALAR
        if kind_v == "string" then
          n = n + 2; out[n - 1] = STRING_PREFIX[#v]; out[n] = v
        elseif kind_v == "number" then
          n = n + 1
          if math_type(v) == "float" then out[n] = pack_string("<Bd", B_FLOAT, v)
          elseif v >= 0 and v < 1024 then out[n] = INT_BYTES[v]
          elseif v >= INT32_MIN and v <= INT32_MAX then out[n] = pack_string("<Bi4", B_INT, v)
          else out[n] = long_bytes(v) end
        elseif kind_v == "boolean" then
          n = n + 1; out[n] = v and "T" or "F"
        elseif kind_v == "table" then
          n = enc_table(v, k, n)
        else
          n = enc(v, k, n)
        end
      end
      n = n + 1; out[n] = "0"
    end
    if depth > SCAN_DEPTH then visiting[t] = nil end
    depth = depth - 1
    if n >= FLUSH_AT then
      chunk_count = chunk_count + 1; chunks[chunk_count] = concat(out, "", 1, n); n = 0
      check_at = TICK
    end
    return n
  end

  function enc(v, key, n)
    local kind = type(v)
    if kind == "string" then
      n = n + 2; out[n - 1] = STRING_PREFIX[#v]; out[n] = v
    elseif kind == "number" then
      n = n + 1
      if math_type(v) == "integer" then
        if v >= 0 and v < 1024 then out[n] = INT_BYTES[v]
        elseif v >= INT32_MIN and v <= INT32_MAX then out[n] = pack_string("<Bi4", B_INT, v)
        else out[n] = long_bytes(v) end
      else
        out[n] = pack_string("<Bd", B_FLOAT, v)
      end
    elseif kind == "boolean" then
      n = n + 1; out[n] = v and "T" or "F"
    elseif kind == "table" then
      return enc_table(v, key, n)
    elseif kind == "nil" then
      n = n + 1; out[n] = "N"
    else
      fail(key, "cannot convert a Lua " .. kind .. " to Python")
    end
    return n
  end

  local n = enc(value, nil, 0)
  if chunk_count == 0 then return concat(out, "", 1, n) end
  chunk_count = chunk_count + 1; chunks[chunk_count] = concat(out, "", 1, n)
  return concat(chunks, "", 1, chunk_count)
end

local function encode(value)
  local ok, result = pcall(encode_pass, value, true)
  if ok then return result end
  if result ~= RESTART then error(result, 0) end
  return encode_pass(value, false)
end

return encode
