-- The Lua codec as it was before states crossed lazily (kept for the
-- round-trip benchmark's baseline only): the whole state decoded into Lua
-- tables before a call, the whole result encoded after it. Returns
-- {decode = ..., encode = ...}.
local lib = ...
local type, next, error, tostring = lib.type, lib.next, lib.error, lib.tostring
local rawget, rawlen, setmetatable = lib.rawget, lib.rawlen, lib.setmetatable
local math_type, format, sub, byte, char = lib.math_type, lib.format, lib.sub, lib.byte, lib.char
local concat, unpack_string, pack_string = lib.concat, lib.unpack_string, lib.pack_string
local CONVERT = lib.CONVERT
-- convert.py's MAX_DEPTH and the reason it gives: containers nested deeper
-- are refused both ways, with their path.
local MAX_DEPTH, DEPTH_REASON = lib.MAX_DEPTH, lib.DEPTH_REASON
local PATH_KEYS_SHOWN = 8

-- Values cross as Python marshal bytes (format 4) both ways: Python reads
-- and writes them in C, strings need no escaping, and int/float and key
-- types survive exactly. What Python container a table came from is kept
-- in KIND, a private weak-keyed table (never a metatable user code could
-- reach): true = a list, an integer = a list of that length whose tail is
-- None, false = a dict whose keys are all integers (so it stays a dict).
local KIND = setmetatable({}, {__mode = "k"})

local B_NULL, B_NONE, B_FALSE, B_TRUE = 48, 78, 70, 84                    -- 0 N F T
local B_INT, B_LONG, B_FLOAT = 105, 108, 103                               -- i l g
local B_UNICODE, B_INTERNED, B_ASCII, B_ASCII_INTERNED = 117, 116, 97, 65   -- u t a A
local B_SHORT_ASCII, B_SHORT_ASCII_INTERNED, B_BYTES = 122, 90, 115         -- z Z s
local B_TUPLE, B_SMALL_TUPLE, B_LIST, B_DICT, B_REF = 40, 41, 91, 123, 114  -- ( ) [ { r
local FLAG_REF = 128

local function decode(data)
  local pos = 1
  local refs, building, ref_count = {}, {}, 0
  local depth = 0
  local read

  -- The path is found on the Python side, from the original value.
  local function enter()
    depth = depth + 1
    if depth > MAX_DEPTH then error(CONVERT .. DEPTH_REASON, 0) end
  end

  local function list_of(count, flagged)
    enter()
    local t = {}
    if flagged then ref_count = ref_count + 1; refs[ref_count] = t end
    building[t] = true
    local last = 0
    for i = 1, count do
      local v = read()
      if v ~= nil then t[i] = v; last = i end
    end
    building[t] = nil
    depth = depth - 1
    -- Trailing None would be lost (a table cannot hold nil): keep the length.
    KIND[t] = last == count or count
    return t
  end

  function read()
    local code = byte(data, pos)
    if code == nil then error(CONVERT .. "truncated data", 0) end
    pos = pos + 1
    local flagged = code >= FLAG_REF
    if flagged then code = code - FLAG_REF end
    local value
    if code == B_REF then
      local index
      index, pos = unpack_string("<i4", data, pos)
      value = refs[index + 1]
      if building[value] then
        error(CONVERT .. "cycle (a container that contains itself)", 0)
      end
      return value
    elseif code == B_SHORT_ASCII or code == B_SHORT_ASCII_INTERNED then
      local size = byte(data, pos)
      value = sub(data, pos + 1, pos + size); pos = pos + 1 + size
    elseif code == B_INT then
      value, pos = unpack_string("<i4", data, pos)
    elseif code == B_FLOAT then
      value, pos = unpack_string("<d", data, pos)
    elseif code == B_DICT then
      enter()
      local t = {}
      if flagged then ref_count = ref_count + 1; refs[ref_count] = t end
      building[t] = true
      local int_keys = true
      while byte(data, pos) ~= B_NULL do
        local k = read()
        local v = read()
        if type(k) ~= "string" then
          if k == nil then error(CONVERT .. "None cannot be a Lua table key", 0) end
          if k ~= k then error(CONVERT .. "NaN cannot be a Lua table key", 0) end
          if type(k) == "table" then error(CONVERT .. "a container cannot be a key", 0) end
          if int_keys and v ~= nil and math_type(k) ~= "integer" then int_keys = false end
        elseif v ~= nil then
          int_keys = false
        end
        -- A None value drops its key: a Lua table cannot hold nil.
        if v ~= nil then t[k] = v end
      end
      pos = pos + 1
      building[t] = nil
      depth = depth - 1
      if int_keys and next(t) ~= nil then KIND[t] = false end
      return t
    elseif code == B_UNICODE or code == B_INTERNED or code == B_ASCII or code == B_ASCII_INTERNED
        or code == B_BYTES then
      value, pos = unpack_string("<s4", data, pos)
    elseif code == B_SMALL_TUPLE then
      local count = byte(data, pos); pos = pos + 1
      return list_of(count, flagged)
    elseif code == B_LIST or code == B_TUPLE then
      local count
      count, pos = unpack_string("<i4", data, pos)
      return list_of(count, flagged)
    elseif code == B_TRUE then return true
    elseif code == B_FALSE then return false
    elseif code == B_NONE then return nil
    elseif code == B_LONG then
      local digits
      digits, pos = unpack_string("<i4", data, pos)
      local negative = digits < 0
      if negative then digits = -digits end
      if digits > 5 then error(CONVERT .. "integer does not fit in 64 bits", 0) end
      local n, scale = 0, 1
      for i = 1, digits do
        local d
        d, pos = unpack_string("<I2", data, pos)
        -- 4 digits hold 60 bits; a 5th may add 3 more (8 only for -2^63).
        if i == 5 and (d > 8 or (d == 8 and not (negative and n == 0))) then
          error(CONVERT .. "integer does not fit in 64 bits", 0)
        end
        n = n + d * scale
        scale = scale * 32768
      end
      value = negative and -n or n
    else
      error(format(CONVERT .. "unsupported value (marshal code %q)", char(code)), 0)
    end
    if flagged then ref_count = ref_count + 1; refs[ref_count] = value end
    return value
  end

  return read()
end

local INT32_MIN, INT32_MAX = -2147483648, 2147483647

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
-- slowest step of encoding. Weak values: they cannot grow without bound.
local function memo(build)
  return setmetatable({}, {__index = function(cache, key)
    local value = build(key)
    cache[key] = value
    return value
  end, __mode = "v"})
end
local STRING_PREFIX = memo(function(size) return pack_string("<Bi4", B_UNICODE, size) end)
local LIST_PREFIX = memo(function(size) return pack_string("<Bi4", B_LIST, size) end)
local INT_BYTES = memo(function(v) return pack_string("<Bi4", B_INT, v) end)
local KEY_BYTES = memo(function(key) return pack_string("<Bs4", B_UNICODE, key) end)

local function key_text(k)
  if type(k) == "string" then return "['" .. k .. "']" end
  return "[" .. tostring(k) .. "]"
end

local function encode(value)
  local out, n = {}, 0
  local visiting = {}
  local keys, depth = {}, 0

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

  local function enc_table(t, key)
    if visiting[t] then fail(key, "cycle (a table that contains itself)") end
    visiting[t] = true
    depth = depth + 1
    keys[depth] = key
    if depth > MAX_DEPTH then fail(nil, DEPTH_REASON) end
    local length = rawlen(t)
    local kind = KIND[t]
    local list = kind or (kind == nil and length > 0)
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
        if v == nil then n = n + 1; out[n] = "N" else enc(v, i) end
      end
    else
      n = n + 1; out[n] = "{"
      for k, v in next, t do
        -- The common case inline: a string key and a string or float value.
        if type(k) == "string" then
          n = n + 1; out[n] = KEY_BYTES[k]
        elseif type(k) == "table" then
          fail(k, "a table cannot be a Python dict key")
        else
          enc(k, k)
        end
        local kind_v = type(v)
        if kind_v == "string" then
          n = n + 2; out[n - 1] = STRING_PREFIX[#v]; out[n] = v
        elseif kind_v == "number" and math_type(v) == "float" then
          n = n + 1; out[n] = pack_string("<Bd", B_FLOAT, v)
        else
          enc(v, k)
        end
      end
      n = n + 1; out[n] = "0"
    end
    depth = depth - 1
    visiting[t] = nil
  end

  function enc(v, key)
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
      enc_table(v, key)
    elseif kind == "nil" then
      n = n + 1; out[n] = "N"
    else
      fail(key, "cannot convert a Lua " .. kind .. " to Python")
    end
  end

  enc(value, nil)
  return concat(out, "", 1, n)
end

return {decode = decode, encode = encode}
