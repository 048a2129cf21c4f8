-- Sandbox setup for one isobranch Lua VM. Runs once per VM, before any user
-- code. Everything the engine needs is captured here as a local, so user code
-- that replaces globals cannot reach or break it.
local wall_check, hook_count = ...

local type, next, pairs, ipairs, select, error = type, next, pairs, ipairs, select, error
local rawget, rawset, rawlen, rawequal = rawget, rawset, rawlen, rawequal
local getmetatable, setmetatable, tostring, load = getmetatable, setmetatable, tostring, load
local xpcall, pcall = xpcall, pcall
local math_type, huge = math.type, math.huge
local find, format, sub, byte = string.find, string.format, string.sub, string.byte
local concat, pack, unpack = table.concat, table.pack, table.unpack
local co_create, co_resume, co_status, co_close = coroutine.create, coroutine.resume,
  coroutine.status, coroutine.close
local sethook = debug.sethook
local clock = os.clock
local G = _G

---------------------------------------------------------------- time limit
local TIMEOUT = setmetatable({}, {__name = "isobranch.timeout"})
local armed, expired, last_cpu = false, false, 0
local CPU_SLICE = 0.005

local function hook()
  if not armed then return end
  if expired then error(TIMEOUT, 0) end
  local now = clock()
  if now - last_cpu >= CPU_SLICE then
    last_cpu = now
    if wall_check() then
      expired = true
      -- From now on every instruction raises, so no pcall loop can go on.
      sethook(hook, "", 1)
      error(TIMEOUT, 0)
    end
  end
end

local function hook_thread(co)
  if hook_count then sethook(co, hook, "", hook_count) end
  return co
end

---------------------------------------------------------------- sandbox
local raw_load, raw_collect = load, collectgarbage
G.python = nil
G.io, G.debug, G.package, G.require, G.dofile, G.loadfile = nil, nil, nil, nil, nil, nil
G.os = {time = os.time, clock = os.clock, date = os.date}
string.dump = nil
G.collectgarbage = function(option)
  if option == "count" then return raw_collect("count") end
  error("collectgarbage: only \"count\" is available in the sandbox", 2)
end
G.load = function(chunk, name, mode, ...)
  if select("#", ...) > 0 then return raw_load(chunk, name, "t", (...)) end
  return raw_load(chunk, name, "t")
end
G.setmetatable = function(t, mt)
  -- Finalizers run with hooks disabled: a looping __gc could never be stopped.
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc metamethods are not allowed in the sandbox", 2)
  end
  return setmetatable(t, mt)
end
local coroutine_lib = G.coroutine
coroutine_lib.create = function(f) return hook_thread(co_create(f)) end
coroutine_lib.wrap = function(f)
  local co = hook_thread(co_create(f))
  return function(...)
    local results = pack(co_resume(co, ...))
    if results[1] then return unpack(results, 2, results.n) end
    if co_status(co) == "dead" then co_close(co) end
    error(results[2], 0)
  end
end
G.xpcall = function(f, handler, ...)
  -- A timeout raised by the hook leaves hooks disabled until the error reaches
  -- a protected call, and message handlers run before that: a user handler
  -- would run unstoppable. After a timeout, handlers are skipped.
  return xpcall(f, function(err)
    if expired then return err end
    return handler(err)
  end, ...)
end
getmetatable("").__metatable = false

---------------------------------------------------------------- Python -> Lua
-- Values arrive as Python marshal bytes (format 4) and leave as marshal
-- bytes: both ends are C-speed, strings need no escaping, and integer,
-- float and key types survive exactly.
local LIST = {__name = "isobranch.list"}       -- marks tables that came from lists
-- Marks dicts whose keys are all integers, so {1: x} does not come back as [x].
local INT_DICT = {__name = "isobranch.dict"}
local unpack_string, pack_string, char = string.unpack, string.pack, string.char
local B_NULL, B_NONE, B_FALSE, B_TRUE = 48, 78, 70, 84          -- 0 N F T
local B_INT, B_LONG, B_FLOAT = 105, 108, 103                     -- i l g
local B_UNICODE, B_INTERNED, B_ASCII, B_ASCII_INTERNED = 117, 116, 97, 65   -- u t a A
local B_SHORT_ASCII, B_SHORT_ASCII_INTERNED, B_BYTES = 122, 90, 115         -- z Z s
local B_TUPLE, B_SMALL_TUPLE, B_LIST, B_DICT, B_REF = 40, 41, 91, 123, 114  -- ( ) [ { r
local FLAG_REF = 128

local function decode(data)
  raw_collect("stop")
  local pos = 1
  local refs, building, ref_count = {}, {}, 0
  local read

  local function list_of(count, flagged)
    local t = setmetatable({}, LIST)
    if flagged then ref_count = ref_count + 1; refs[ref_count] = t end
    building[t] = true
    local holes = false
    for i = 1, count do
      local v = read()
      if v == nil then holes = true else t[i] = v end
    end
    building[t] = nil
    if holes then setmetatable(t, {__name = "isobranch.list", n = count}) end
    return t
  end

  function read()
    local code = byte(data, pos)
    if code == nil then error("isobranch.convert: truncated data", 0) end
    pos = pos + 1
    local flagged = code >= FLAG_REF
    if flagged then code = code - FLAG_REF end
    local value
    if code == B_REF then
      local index
      index, pos = unpack_string("<i4", data, pos)
      value = refs[index + 1]
      if type(value) == "table" and building[value] then
        error("isobranch.convert: cycle (a container that contains itself)", 0)
      end
      return value
    elseif code == B_SHORT_ASCII or code == B_SHORT_ASCII_INTERNED then
      local size = byte(data, pos)
      value = sub(data, pos + 1, pos + size); pos = pos + 1 + size
    elseif code == B_INT then
      value, pos = unpack_string("<i4", data, pos)
    elseif code == B_UNICODE or code == B_INTERNED or code == B_ASCII or code == B_ASCII_INTERNED
        or code == B_BYTES then
      value, pos = unpack_string("<s4", data, pos)
    elseif code == B_FLOAT then
      value, pos = unpack_string("<d", data, pos)
    elseif code == B_DICT then
      local t = {}
      if flagged then ref_count = ref_count + 1; refs[ref_count] = t end
      building[t] = true
      local int_keys = true
      while byte(data, pos) ~= B_NULL do
        local k = read()
        local v = read()
        -- Only entries that exist in Lua count: a None value drops its key.
        if int_keys and v ~= nil and math_type(k) ~= "integer" then int_keys = false end
        if k == nil then error("isobranch.convert: None cannot be a Lua table key", 0) end
        if k ~= k then error("isobranch.convert: NaN cannot be a Lua table key", 0) end
        t[k] = v
      end
      pos = pos + 1
      building[t] = nil
      if int_keys and next(t) ~= nil then setmetatable(t, INT_DICT) end
      return t
    elseif code == B_LIST or code == B_TUPLE then
      local count
      count, pos = unpack_string("<i4", data, pos)
      return list_of(count, flagged)
    elseif code == B_SMALL_TUPLE then
      local count = byte(data, pos); pos = pos + 1
      return list_of(count, flagged)
    elseif code == B_NONE then return nil
    elseif code == B_TRUE then return true
    elseif code == B_FALSE then return false
    elseif code == B_REF then
      local index
      index, pos = unpack_string("<i4", data, pos)
      value = refs[index + 1]
      if type(value) == "table" and building[value] then
        error("isobranch.convert: cycle (a container that contains itself)", 0)
      end
      return value
    elseif code == B_LONG then
      local digits
      digits, pos = unpack_string("<i4", data, pos)
      local negative = digits < 0
      if negative then digits = -digits end
      if digits > 5 then error("isobranch.convert: integer does not fit in 64 bits", 0) end
      local n, scale = 0, 1
      for i = 1, digits do
        local d
        d, pos = unpack_string("<I2", data, pos)
        -- 4 digits hold 60 bits; a 5th may add 3 more (8 only for -2^63).
        if i == 5 and (d > 8 or (d == 8 and not (negative and n == 0))) then
          error("isobranch.convert: integer does not fit in 64 bits", 0)
        end
        n = n + d * scale
        scale = scale * 32768
      end
      value = negative and -n or n
    else
      error(format("isobranch.convert: unsupported value (marshal code %q)", char(code)), 0)
    end
    if flagged then ref_count = ref_count + 1; refs[ref_count] = value end
    return value
  end

  local value = read()
  raw_collect("restart")
  return value
end

---------------------------------------------------------------- Lua -> Python
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

-- Memo tables: most prefixes and small integers repeat, and string.pack is
-- the slowest step of encoding.
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

local function is_list_meta(mt)
  return mt == LIST or (type(mt) == "table" and rawget(mt, "__name") == "isobranch.list")
end

local function encode(value)
  local out, n = {}, 0
  local visiting = {}
  local keys, depth = {}, 0

  local function fail(key, message)
    local parts = {"result"}
    for i = 1, depth do
      local k = keys[i]
      if k ~= nil then
        parts[#parts + 1] = type(k) == "string" and ("['" .. k .. "']") or ("[" .. tostring(k) .. "]")
      end
    end
    if key ~= nil then
      parts[#parts + 1] = type(key) == "string" and ("['" .. key .. "']") or ("[" .. tostring(key) .. "]")
    end
    error("isobranch.convert: " .. concat(parts) .. ": " .. message, 0)
  end

  local enc

  local function enc_table(t, key)
    if visiting[t] then fail(key, "cycle (a table that contains itself)") end
    visiting[t] = true
    depth = depth + 1
    keys[depth] = key
    local length = rawlen(t)
    local mt = getmetatable(t)
    local marked = is_list_meta(mt)
    local list = marked or (length > 0 and mt ~= INT_DICT)
    if list then
      local max_int = 0
      for k in next, t do
        if math_type(k) ~= "integer" or k < 1 then list = false; break end
        if k > max_int then max_int = k end
      end
      if list then
        if marked then
          local declared = type(mt) == "table" and rawget(mt, "n")
          if math_type(declared) == "integer" and declared > max_int then max_int = declared end
          length = max_int
        elseif max_int ~= length then
          list = false
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
        -- The common case inline: a string key and a string or number value.
        if type(k) == "string" then
          n = n + 1; out[n] = KEY_BYTES[k]
        elseif type(k) == "table" then
          fail(k, "a table cannot be a Python dict key")
        else
          enc(k, k)
        end
        local kind = type(v)
        if kind == "string" then
          n = n + 2; out[n - 1] = STRING_PREFIX[#v]; out[n] = v
        elseif kind == "number" and math_type(v) == "float" then
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

  -- Encoding makes little garbage: pausing the collector saves its
  -- incremental steps (run() restarts it whatever happens).
  raw_collect("stop")
  enc(value, nil)
  return concat(out, "", 1, n)
end

---------------------------------------------------------------- calls
local handled
local function on_error(err)
  handled = true
  if type(err) == "string" then return err end
  if rawequal(err, TIMEOUT) then return "timeout" end
  -- Never call tostring here: a __tostring metamethod is user code.
  return "(error object is a " .. type(err) .. " value)"
end

-- Modes: "execute" (state is a global, returns the chunk's value),
-- "node" (state and variables are locals), "condition" (an expression).
local function run(mode, code, chunk_name, state_source, variables_source)
  local state = state_source and decode(state_source) or nil
  local variables = variables_source and decode(variables_source) or nil
  local fn, err
  if mode == "node" then
    fn, err = raw_load("local state, variables = ...; " .. code, chunk_name, "t", G)
  elseif mode == "condition" then
    fn = raw_load("return " .. code, chunk_name, "t", G)
    if not fn then fn, err = raw_load(code, chunk_name, "t", G) end
  else
    fn, err = raw_load(code, chunk_name, "t", G)
  end
  if not fn then return "error", err end
  if mode ~= "node" then
    G.state = state
    G.variables = variables
  end
  handled = false
  expired = false
  last_cpu = clock()
  armed = true
  if hook_count then sethook(hook, "", hook_count) end
  local ok, text = xpcall(function()
    local result = fn(state, variables)
    return encode(result)
  end, on_error)
  armed = false
  raw_collect("restart")
  if hook_count then sethook() end
  if expired then return "timeout", "timeout" end
  if ok then return "ok", text end
  if not handled then return "memory", text end
  if find(text, "^isobranch%.convert: ") then return "convert", sub(text, 20) end
  return "error", text
end

return run
