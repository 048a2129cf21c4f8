-- Conversion between Python marshal bytes and Lua values, for isobranch's
-- sandbox (sandbox.lua loads it on first use, with an empty environment and
-- the library functions it needs passed in, so nothing user code did to the
-- globals can reach it). Returns {decode = ..., encode = ...}.
local lib = ...
local type, next, error, tostring = lib.type, lib.next, lib.error, lib.tostring
local rawget, rawlen, setmetatable = lib.rawget, lib.rawlen, lib.setmetatable
local math_type, format, sub, byte, char = lib.math_type, lib.format, lib.sub, lib.byte, lib.char
local concat, unpack_string, pack_string = lib.concat, lib.unpack_string, lib.pack_string
local CONVERT = lib.CONVERT
-- Conversion runs without the count hook (sandbox.lua's unhooked), so it
-- looks at the clock itself, every TICK values: check_time raises the
-- timeout once a call's deadline has passed.
local check_time = lib.check_time
local TICK <const> = 1024
local ticks = TICK
-- Lazily filled states (lazy.lua): each is filled before it is encoded.
local LAZY, fill_lazy = lib.LAZY, lib.fill_lazy
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

local B_NULL <const>, B_NONE <const>, B_FALSE <const>, B_TRUE <const> = 48, 78, 70, 84 -- 0 N F T
local B_INT <const>, B_LONG <const>, B_FLOAT <const> = 105, 108, 103                  -- i l g
local B_UNICODE <const>, B_INTERNED <const> = 117, 116                                 -- u t
local B_ASCII <const>, B_ASCII_INTERNED <const> = 97, 65                               -- a A
local B_SHORT_ASCII <const>, B_SHORT_ASCII_INTERNED <const>, B_BYTES <const> = 122, 90, 115 -- z Z s
local B_TUPLE <const>, B_SMALL_TUPLE <const>, B_LIST <const> = 40, 41, 91              -- ( ) [
local B_DICT <const>, B_REF <const> = 123, 114                                         -- { r
local FLAG_REF <const> = 128
local B_KEY_FIRST <const> = B_SHORT_ASCII_INTERNED + FLAG_REF -- an interned key, first time

-- Table constructors that make an empty table with room for n entries.
-- (nil fields size the table without filling it.)
local LIST_OF_SIZE = {
  function() return {nil} end, function() return {nil, nil} end,
  function() return {nil, nil, nil} end, function() return {nil, nil, nil, nil} end,
  function() return {nil, nil, nil, nil, nil} end, function() return {nil, nil, nil, nil, nil, nil} end,
  function() return {nil, nil, nil, nil, nil, nil, nil} end,
  function() return {nil, nil, nil, nil, nil, nil, nil, nil} end,
}
local function room_for_1() return {a = nil} end
local function room_for_2() return {a = nil, b = nil} end
local function room_for_4() return {a = nil, b = nil, c = nil, d = nil} end
local function room_for_8() return {a = nil, b = nil, c = nil, d = nil, e = nil, f = nil, g = nil,
                                    h = nil} end
local function room_for_16() return {a = nil, b = nil, c = nil, d = nil, e = nil, f = nil, g = nil,
  h = nil, i = nil, j = nil, k = nil, l = nil, m = nil, n = nil, o = nil, p = nil} end
-- Indexed by 1 + the number of keys expected.
local DICT_OF_SIZE = {room_for_1, room_for_1, room_for_2, room_for_4, room_for_4, room_for_8,
  room_for_8, room_for_8, room_for_8, room_for_16, room_for_16, room_for_16, room_for_16,
  room_for_16, room_for_16, room_for_16, room_for_16}
local DICT_SIZES = #DICT_OF_SIZE

-- Speed: this runs once per value of every state crossing into Lua. One
-- string.byte call reads a value's type code and the 4 bytes after it,
-- which hold a back reference's index, an int32 or a short string's size;
-- the value types JSON-like data is made of are read inline in the list
-- and dict loops, everything else through read().
-- depth: how deep in the whole value the decoded one sits (0 for the root).
local function decode(data, depth)
  local pos = 1
  local refs, building, ref_count = {}, {}, 0
  -- Which back references are strings (most keys are): no type() call then.
  local ref_is_string = {}
  depth = depth or 0
  local read

  -- Errors name no path: the Python side finds it from the original value.
  local function cycle()
    error(CONVERT .. "cycle (a container that contains itself)", 0)
  end

  -- Tables are made with room for what goes in: growing one key at a time
  -- would rehash it at every power of two. A list's length is known; a
  -- dict is given room for as many keys as the previous dict had (the
  -- dicts of a list are often alike).
  local dict_hint = 1
  local list_of, dict

  -- Only a flagged container can be referred to again, so only a flagged
  -- one is marked as being built (a reference to it then is a cycle).
  function list_of(count, flagged)
    depth = depth + 1
    if depth > MAX_DEPTH then error(CONVERT .. DEPTH_REASON, 0) end
    local make = LIST_OF_SIZE[count]
    local t = make and make() or {}
    if flagged then ref_count = ref_count + 1; refs[ref_count] = t; building[t] = true end
    local last = 0
    for i = 1, count do
      local code, b1, b2, b3, b4 = byte(data, pos, pos + 4)
      ticks = ticks - 1
      if ticks == 0 then ticks = TICK; check_time() end
      local v
      if code == B_REF then
        v = refs[b1 + b2 * 256 + b3 * 65536 + b4 * 16777216 + 1]; pos = pos + 5
        if building[v] then cycle() end
      elseif code == B_SHORT_ASCII then
        v = sub(data, pos + 2, pos + 1 + b1); pos = pos + 2 + b1
      elseif code == B_INT then
        v = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216; pos = pos + 5
        if v >= 2147483648 then v = v - 4294967296 end
      elseif code == B_FLOAT then
        v, pos = unpack_string("<d", data, pos + 1)
      elseif code == B_DICT then
        pos = pos + 1; v = dict(false)
      elseif code == B_LIST then
        pos = pos + 5; v = list_of(b1 + b2 * 256 + b3 * 65536 + b4 * 16777216, false)
      else
        v = read()
      end
      if v ~= nil then t[i] = v; last = i end
    end
    if flagged then building[t] = nil end
    depth = depth - 1
    -- Trailing None would be lost (a table cannot hold nil): keep the length.
    KIND[t] = last == count or count
    return t
  end

  function dict(flagged)
    depth = depth + 1
    if depth > MAX_DEPTH then error(CONVERT .. DEPTH_REASON, 0) end
    local t = DICT_OF_SIZE[dict_hint]()
    if flagged then ref_count = ref_count + 1; refs[ref_count] = t; building[t] = true end
    local int_keys, count = true, 0
    while true do
      -- Most keys are back references: then one call reads the value's code too.
      local code, b1, b2, b3, b4, c, c1, c2, c3, c4 = byte(data, pos, pos + 9)
      if code == B_NULL then break end
      ticks = ticks - 1
      if ticks == 0 then ticks = TICK; check_time() end
      local k, v, string_key
      if code == B_REF then
        -- A container key is refused below, whether it is being built or not.
        local index = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216 + 1
        k, string_key = refs[index], ref_is_string[index]
        pos = pos + 5
        code, b1, b2, b3, b4 = c, c1, c2, c3, c4
      else
        if code == B_KEY_FIRST then
          k = sub(data, pos + 2, pos + 1 + b1); pos = pos + 2 + b1
          ref_count = ref_count + 1; refs[ref_count] = k; ref_is_string[ref_count] = true
          string_key = true
        elseif code == B_SHORT_ASCII then
          k = sub(data, pos + 2, pos + 1 + b1); pos = pos + 2 + b1
          string_key = true
        else
          k = read()
        end
        code, b1, b2, b3, b4 = byte(data, pos, pos + 4)
      end
      if code == B_REF then
        v = refs[b1 + b2 * 256 + b3 * 65536 + b4 * 16777216 + 1]; pos = pos + 5
        if building[v] then cycle() end
      elseif code == B_SHORT_ASCII then
        v = sub(data, pos + 2, pos + 1 + b1); pos = pos + 2 + b1
      elseif code == B_INT then
        v = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216; pos = pos + 5
        if v >= 2147483648 then v = v - 4294967296 end
      elseif code == B_FLOAT then
        v, pos = unpack_string("<d", data, pos + 1)
      elseif code == B_TRUE then
        v = true; pos = pos + 1
      elseif code == B_FALSE then
        v = false; pos = pos + 1
      elseif code == B_DICT then
        pos = pos + 1; v = dict(false)
      elseif code == B_LIST then
        pos = pos + 5; v = list_of(b1 + b2 * 256 + b3 * 65536 + b4 * 16777216, false)
      else
        v = read()
      end
      count = count + 1
      if string_key or type(k) == "string" then
        -- A None value drops its key: a Lua table cannot hold nil.
        if v ~= nil then t[k] = v; int_keys = false end
      else
        if k == nil then error(CONVERT .. "None cannot be a Lua table key", 0) end
        if k ~= k then error(CONVERT .. "NaN cannot be a Lua table key", 0) end
        if type(k) == "table" then error(CONVERT .. "a container cannot be a key", 0) end
        if v ~= nil then
          t[k] = v
          if int_keys and math_type(k) ~= "integer" then int_keys = false end
        end
      end
    end
    pos = pos + 1
    if flagged then building[t] = nil end
    depth = depth - 1
    dict_hint = count < DICT_SIZES and count + 1 or DICT_SIZES
    if int_keys and next(t) ~= nil then KIND[t] = false end
    return t
  end

  function read()
    local code, b1, b2, b3, b4 = byte(data, pos, pos + 4)
    if code == nil then error(CONVERT .. "truncated data", 0) end
    local flagged = code >= FLAG_REF
    if flagged then code = code - FLAG_REF end
    local value
    if code == B_REF then
      pos = pos + 5
      value = refs[b1 + b2 * 256 + b3 * 65536 + b4 * 16777216 + 1]
      if building[value] then cycle() end
      return value
    elseif code == B_SHORT_ASCII or code == B_SHORT_ASCII_INTERNED then
      value = sub(data, pos + 2, pos + 1 + b1); pos = pos + 2 + b1
    elseif code == B_INT then
      value = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216; pos = pos + 5
      if value >= 2147483648 then value = value - 4294967296 end
    elseif code == B_FLOAT then
      value, pos = unpack_string("<d", data, pos + 1)
    elseif code == B_DICT then
      pos = pos + 1
      return dict(flagged)
    elseif code == B_UNICODE or code == B_INTERNED or code == B_ASCII or code == B_ASCII_INTERNED
        or code == B_BYTES then
      value, pos = unpack_string("<s4", data, pos + 1)
    elseif code == B_SMALL_TUPLE then
      pos = pos + 2
      return list_of(b1, flagged)
    elseif code == B_LIST or code == B_TUPLE then
      local count
      count, pos = unpack_string("<i4", data, pos + 1)
      return list_of(count, flagged)
    elseif code == B_TRUE then pos = pos + 1; return true
    elseif code == B_FALSE then pos = pos + 1; return false
    elseif code == B_NONE then pos = pos + 1; return nil
    elseif code == B_LONG then
      local digits
      digits, pos = unpack_string("<i4", data, pos + 1)
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
-- A string key is written once per result, flagged so that Python keeps a
-- reference to it, and then as a back reference ('r' and its index):
-- Python then makes one str per distinct key, not one per dict entry.
local KEY_BYTES = memo(function(key) return pack_string("<Bs4", B_UNICODE + FLAG_REF, key) end)
local REF_BYTES = memo(function(index) return pack_string("<Bi4", B_REF, index) end)

local function key_text(k)
  if type(k) == "string" then return "['" .. k .. "']" end
  return "[" .. tostring(k) .. "]"
end

local function encode(value)
  local out, n = {}, 0
  local visiting = {}
  local keys, depth = {}, 0
  -- String key -> its reference index in this result (0-based, as Python counts).
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
  -- go through enc().
  local function enc_table(t, key)
    if visiting[t] then fail(key, "cycle (a table that contains itself)") end
    if LAZY[t] then fill_lazy(t) end
    visiting[t] = true
    depth = depth + 1
    keys[depth] = key
    if depth > MAX_DEPTH then fail(nil, DEPTH_REASON) end
    local kind = KIND[t]
    local list = kind
    if kind == nil then list = rawlen(t) > 0 end
    if list then
      -- One pass when next gives exactly 1, 2, ..., n in order (a sequence
      -- in the array part, the usual case); else the output is dropped and
      -- the checks below decide.
      local start, expected, refs_before = n, 1, ref_count
      n = n + 1
      for k, v in next, t do
        if k ~= expected then list = nil; break end
        ticks = ticks - 1
        if ticks == 0 then ticks = TICK; check_time() end
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
          enc_table(v, k)
        else
          enc(v, k)
        end
      end
      if list then
        local length = expected - 1
        if math_type(kind) == "integer" then
          for _ = length + 1, kind do n = n + 1; out[n] = "N" end
          if kind > length then length = kind end
        end
        out[start + 1] = LIST_PREFIX[length]
        depth = depth - 1
        visiting[t] = nil
        return
      end
      -- Dropped output: keys first written in it must be written again.
      n = start
      for i = ref_count, refs_before + 1, -1 do key_refs[ref_keys[i]] = nil end
      ref_count = refs_before
      list = true
    end
    local length = rawlen(t)
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
        ticks = ticks - 1
        if ticks == 0 then ticks = TICK; check_time() end
        if v == nil then n = n + 1; out[n] = "N" else enc(v, i) end
      end
    else
      n = n + 1; out[n] = "{"
      for k, v in next, t do
        ticks = ticks - 1
        if ticks == 0 then ticks = TICK; check_time() end
        local index = key_refs[k]
        if index then
          n = n + 1; out[n] = REF_BYTES[index]
        elseif type(k) == "string" then
          n = n + 1; out[n] = KEY_BYTES[k]
          key_refs[k] = ref_count; ref_count = ref_count + 1; ref_keys[ref_count] = k
        elseif type(k) == "table" then
          fail(k, "a table cannot be a Python dict key")
        else
          enc(k, k)
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
          enc_table(v, k)
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
