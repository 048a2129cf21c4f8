-- Sandbox setup for one isobranch Lua VM. Runs once per VM, before any user
-- code. Everything the engine needs is captured here as a local, so user code
-- that replaces globals cannot reach or break it.
local wall_check, hook_count, codec_bytecode = ...

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
local string_unpack, string_pack, string_char = string.unpack, string.pack, string.char
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

---------------------------------------------------------------- codec
-- Loaded on first use: a VM that only ever sees scalars never pays for it.
local codec
local function get_codec()
  if codec == nil then
    local chunk = raw_load(codec_bytecode, "=isobranch/codec.lua", "b", {})
    codec = chunk({
      type = type, next = next, error = error, tostring = tostring, rawget = rawget,
      rawlen = rawlen, getmetatable = getmetatable, setmetatable = setmetatable,
      math_type = math_type, format = format, sub = sub, byte = byte, concat = concat,
      raw_collect = raw_collect, unpack_string = string_unpack, pack_string = string_pack,
      char = string_char,
    })
  end
  return codec
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
  local state, variables
  if state_source then state = get_codec().decode(state_source) end
  if variables_source then variables = get_codec().decode(variables_source) end
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
  local ok, status, payload = xpcall(function()
    local result = fn(state, variables)
    local kind = type(result)
    if kind == "table" then return "ok", get_codec().encode(result) end
    if kind == "function" or kind == "thread" or kind == "userdata" then
      error("isobranch.convert: result: cannot convert a Lua " .. kind .. " to Python", 0)
    end
    return "scalar", result
  end, on_error)
  armed = false
  raw_collect("restart")
  if hook_count then sethook() end
  if expired then return "timeout", "timeout" end
  if ok then return status, payload end
  if not handled then return "memory", status end
  if find(status, "^isobranch%.convert: ") then return "convert", sub(status, 20) end
  return "error", status
end

return run
