-- Python marshal bytes -> Lua values, for isobranch's sandbox (sandbox.lua
-- loads it the first time a VM decodes a table, with an empty environment
-- and the library functions it needs passed in, so nothing user code did to
-- the globals can reach it). Returns decode(data, depth). encode.lua is the
-- other way.
local lib = ...
local type, next, error = lib.type, lib.next, lib.error
local math_type, format, sub, byte, char = lib.math_type, lib.format, lib.sub, lib.byte, lib.char
local unpack_string = lib.unpack_string
local CONVERT = lib.CONVERT
-- Decoding an input is not timed (the runtime stops the call's clock
-- meanwhile): its size is the caller's, not the Lua code's.
-- convert.py's MAX_DEPTH and the reason it gives: containers nested deeper
-- are refused both ways, with their path.
local MAX_DEPTH, DEPTH_REASON = lib.MAX_DEPTH, lib.DEPTH_REASON

-- Values cross as Python marshal bytes (format 4) both ways: Python reads
-- and writes them in C, strings need no escaping, and int/float and key
-- types survive exactly. What Python container a table came from is kept
-- in KIND, a private weak-keyed table (never a metatable user code could
-- reach, shared with encode.lua): true = a list, an integer = a list of
-- that length whose tail is None, false = a dict whose keys are all
-- integers (so it stays a dict).
local KIND = lib.KIND

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
-- The read position is passed to each reader and returned with its value:
-- a local costs a third of the instructions a shared upvalue does.
local function decode(data, depth)
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
  function list_of(count, flagged, pos)
    depth = depth + 1
    if depth > MAX_DEPTH then error(CONVERT .. DEPTH_REASON, 0) end
    local make = LIST_OF_SIZE[count]
    local t = make and make() or {}
    if flagged then ref_count = ref_count + 1; refs[ref_count] = t; building[t] = true end
    local last = 0
    for i = 1, count do
      local code, b1, b2, b3, b4 = byte(data, pos, pos + 4)
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
        v, pos = dict(false, pos + 1)
      elseif code == B_LIST then
        v, pos = list_of(b1 + b2 * 256 + b3 * 65536 + b4 * 16777216, false, pos + 5)
      else
        v, pos = read(pos)
      end
      if v ~= nil then t[i] = v; last = i end
    end
    if flagged then building[t] = nil end
    depth = depth - 1
    -- Trailing None would be lost (a table cannot hold nil): keep the length.
    KIND[t] = last == count or count
    return t, pos
  end

  function dict(flagged, pos)
    depth = depth + 1
    if depth > MAX_DEPTH then error(CONVERT .. DEPTH_REASON, 0) end
    local t = DICT_OF_SIZE[dict_hint]()
    if flagged then ref_count = ref_count + 1; refs[ref_count] = t; building[t] = true end
    local int_keys, count = true, 0
    while true do
      -- Most keys are back references: then one call reads the value's code too.
      local code, b1, b2, b3, b4, c, c1, c2, c3, c4 = byte(data, pos, pos + 9)
      if code == B_NULL then break end
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
          k, pos = read(pos)
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
        v, pos = dict(false, pos + 1)
      elseif code == B_LIST then
        v, pos = list_of(b1 + b2 * 256 + b3 * 65536 + b4 * 16777216, false, pos + 5)
      else
        v, pos = read(pos)
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
    return t, pos
  end

  function read(pos)
    local code, b1, b2, b3, b4 = byte(data, pos, pos + 4)
    if code == nil then error(CONVERT .. "truncated data", 0) end
    local flagged = code >= FLAG_REF
    if flagged then code = code - FLAG_REF end
    local value
    if code == B_REF then
      pos = pos + 5
      value = refs[b1 + b2 * 256 + b3 * 65536 + b4 * 16777216 + 1]
      if building[value] then cycle() end
      return value, pos
    elseif code == B_SHORT_ASCII or code == B_SHORT_ASCII_INTERNED then
      value = sub(data, pos + 2, pos + 1 + b1); pos = pos + 2 + b1
    elseif code == B_INT then
      value = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216; pos = pos + 5
      if value >= 2147483648 then value = value - 4294967296 end
    elseif code == B_FLOAT then
      value, pos = unpack_string("<d", data, pos + 1)
    elseif code == B_DICT then
      return dict(flagged, pos + 1)
    elseif code == B_UNICODE or code == B_INTERNED or code == B_ASCII or code == B_ASCII_INTERNED
        or code == B_BYTES then
      value, pos = unpack_string("<s4", data, pos + 1)
    elseif code == B_SMALL_TUPLE then
      return list_of(b1, flagged, pos + 2)
    elseif code == B_LIST or code == B_TUPLE then
      local count
      count, pos = unpack_string("<i4", data, pos + 1)
      return list_of(count, flagged, pos)
    elseif code == B_TRUE then return true, pos + 1
    elseif code == B_FALSE then return false, pos + 1
    elseif code == B_NONE then return nil, pos + 1
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
    return value, pos
  end

  local value = read(1)
  return value
end

return decode
