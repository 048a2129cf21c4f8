-- Sandbox for one isobranch Lua VM, precompiled once per process. It runs
-- once per VM, before any user code, and returns the function the runtime
-- calls for every execution. The value conversion code (codec.lua) is
-- loaded only when a VM first converts a table, which keeps VM creation
-- cheap.
-- Everything the engine needs is captured here as a local upvalue, so user
-- code that replaces or mutates globals cannot reach or break it. No table
-- that user code can see carries a metatable of ours: a reachable marker
-- metatable could be given __gc or __newindex and run user code where no
-- hook can stop it.
local wall_check, hook_count, codec_bytecode, on_armed = ...

local type, next, select, error, tostring = type, next, select, error, tostring
local rawget, rawset, rawlen, rawequal = rawget, rawset, rawlen, rawequal
local setmetatable, load, xpcall, pcall = setmetatable, load, xpcall, pcall
local math_type = math.type
local find, format, sub, byte, char = string.find, string.format, string.sub, string.byte,
  string.char
local unpack_string, pack_string = string.unpack, string.pack
local concat, pack, unpack = table.concat, table.pack, table.unpack
local co_create, co_resume, co_status, co_close = coroutine.create, coroutine.resume,
  coroutine.status, coroutine.close
local sethook = debug.sethook
local clock = os.clock
local raw_collect = collectgarbage
local G = _G
local CONVERT = "isobranch.convert: "

---------------------------------------------------------------- time limit
-- A count hook reads the process CPU clock (a cheap C call) and asks Python
-- for the wall clock only once per CPU_SLICE of CPU: a running Lua program
-- always burns CPU, so this never delays the check by more than a slice,
-- and Lua runs without the GIL in between.
local TIMEOUT = setmetatable({}, {__name = "isobranch.timeout", __metatable = false})
local CPU_SLICE = 0.005
-- armed: a call is running. expired: its deadline passed. in_wall_check:
-- stays true if an error (out of memory, say) escaped the hook's Python
-- call, which leaves hooks off on that thread; it is treated as expired.
local armed, expired, in_wall_check, last_cpu = false, false, false, 0

-- Once time is up, every thread whose hook fires is switched to a hook on
-- every instruction before the error is raised. A hook error unwinds only
-- to the nearest pcall, so a thread left on the normal interval would get
-- hook_count more instructions after each caught error: a pcall loop
-- inside a coroutine could then run for ever. On every instruction nothing
-- makes progress: each instruction raises before it executes, so every
-- protected call only unwinds one level further.
local hook
local function expire()
  expired = true
  sethook(hook, "", 1)
  error(TIMEOUT, 0)
end

hook = function()
  if not armed then return end
  if expired or in_wall_check then expire() end
  local now = clock()
  if now - last_cpu >= CPU_SLICE then
    last_cpu = now
    in_wall_check = true
    local past = wall_check()
    in_wall_check = false
    if past then expire() end
  end
end

-- A new coroutine inherits the C side of the hook but not the debug
-- library's Lua function, so each one must be hooked explicitly.
local function hooked(co)
  if hook_count then sethook(co, hook, "", expired and 1 or hook_count) end
  return co
end

-- After an error thrown by the hook, Lua leaves hooks disabled on that
-- thread until a protected call catches it; code that runs before then
-- (message handlers, closing a dead coroutine's <close> variables) would be
-- unstoppable, so the wrappers below refuse to run user code once time is up.
local function out_of_time()
  return expired or in_wall_check
end

---------------------------------------------------------------- sandbox
if package and package.loaded then package.loaded.python = nil end
G.python = nil
G.io, G.debug, G.package, G.require, G.dofile, G.loadfile = nil, nil, nil, nil, nil, nil
G.os = {time = os.time, clock = os.clock, date = os.date}
string.dump = nil
G.collectgarbage = function(option)
  if option == "count" then return raw_collect("count") end
  error("collectgarbage: only \"count\" is available in the sandbox", 2)
end
G.load = function(chunk, name, mode, ...)
  -- Text only: a crafted binary chunk can crash the VM.
  if select("#", ...) > 0 then return load(chunk, name, "t", (...)) end
  return load(chunk, name, "t")
end
G.setmetatable = function(t, mt)
  -- Lua 5.4 runs finalizers with hooks disabled, so a looping __gc could
  -- never be stopped; objects are marked for finalization only here.
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc metamethods are not allowed in the sandbox", 2)
  end
  return setmetatable(t, mt)
end
local coroutine_lib = G.coroutine
-- No new coroutine once time is up: one that was never hooked would not
-- have seen the deadline.
coroutine_lib.create = function(f)
  if out_of_time() then error(TIMEOUT, 0) end
  return hooked(co_create(f))
end
coroutine_lib.wrap = function(f)
  if out_of_time() then error(TIMEOUT, 0) end
  local co = hooked(co_create(f))
  return function(...)
    local results = pack(co_resume(co, ...))
    if results[1] then return unpack(results, 2, results.n) end
    if out_of_time() then error(TIMEOUT, 0) end
    local err = results[2]
    if co_status(co) == "dead" then
      -- Like the built-in wrap: close its <close> variables; their error wins.
      local closed, close_err = co_close(co)
      if not closed then err = close_err end
    end
    error(err, 2)
  end
end
coroutine_lib.close = function(co)
  if out_of_time() then error(TIMEOUT, 0) end
  return co_close(co)
end
G.xpcall = function(f, handler, ...)
  return xpcall(f, function(err)
    if out_of_time() then return err end
    return handler(err)
  end, ...)
end
-- Protect the string metatable: ("").x reaches the string table through it.
getmetatable("").__metatable = false

---------------------------------------------------------------- calls
local codec
local function get_codec()
  if codec == nil then
    -- An empty environment: the codec sees only what it is given.
    codec = load(codec_bytecode, "=isobranch/codec", "b", {})({
      type = type, next = next, error = error, tostring = tostring, rawget = rawget,
      rawlen = rawlen, setmetatable = setmetatable, math_type = math_type, format = format,
      sub = sub, byte = byte, char = char, concat = concat, unpack_string = unpack_string,
      pack_string = pack_string, CONVERT = CONVERT,
    })
  end
  return codec
end

local handled
local function on_error(err)
  -- Runs with hooks disabled after a hook error: only our own code here.
  handled = true
  if type(err) == "string" then return err end
  if rawequal(err, TIMEOUT) then return "timeout" end
  -- Never call tostring here: a __tostring metamethod is user code.
  return "(error object is a " .. type(err) .. " value)"
end

local function call_and_encode(fn, state, variables)
  local result = fn(state, variables)
  local kind = type(result)
  if kind == "table" then
    -- Encoding makes little garbage; pausing the collector saves its steps.
    raw_collect("stop")
    return "ok", get_codec().encode(result)
  end
  if kind == "function" or kind == "thread" or kind == "userdata" then
    error(CONVERT .. "result: cannot convert a Lua " .. kind .. " to Python", 0)
  end
  return "scalar", result
end

local function decode_failed(err)
  raw_collect("restart")
  if find(err, CONVERT, 1, true) == 1 then return "convert_input", sub(err, #CONVERT + 1) end
  if err == "not enough memory" then return "memory", err end
  return "error", err
end

local NODE_PREFIX = "local state, variables = ...; "

-- Modes: "execute" (state is a global, returns the chunk's value),
-- "node" (state and variables are locals), "condition" (an expression).
-- Returns a status ("ok", "scalar", "error", "convert", "timeout",
-- "memory") and a payload.
local function run(mode, code, chunk_name, state_data, variables_data)
  local ok, state, variables
  if state_data or variables_data then
    -- Decoding builds many tables at once: the collector would only slow it.
    raw_collect("stop")
    if state_data then
      ok, state = pcall(get_codec().decode, state_data)
      if not ok then return decode_failed(state) end
    end
    if variables_data then
      ok, variables = pcall(get_codec().decode, variables_data)
      if not ok then return decode_failed(variables) end
    end
    raw_collect("restart")
  end
  local fn, err
  if mode == "node" then
    -- Same line as the user's first line, so line numbers stay right.
    fn, err = load(NODE_PREFIX .. code, chunk_name, "t", G)
  elseif mode == "condition" then
    fn = load("return " .. code, chunk_name, "t", G)
    if not fn then fn, err = load(code, chunk_name, "t", G) end
  else
    fn, err = load(code, chunk_name, "t", G)
  end
  if not fn then
    if err == "not enough memory" then return "memory", err end
    return "error", err
  end
  -- rawset: a metatable user code put on _G must not run before the hook is armed.
  rawset(G, "variables", variables)
  if mode ~= "node" then rawset(G, "state", state) end
  handled, expired, in_wall_check = false, false, false
  last_cpu = clock()
  armed = true
  -- An outside watchdog (a worker's parent) times the call from here on,
  -- after the input has been decoded, as the hook does.
  if on_armed then on_armed() end
  if hook_count then sethook(hook, "", hook_count) end
  local status, payload
  ok, status, payload = xpcall(call_and_encode, on_error, fn, state, variables)
  armed = false
  if hook_count then sethook() end
  raw_collect("restart")
  if expired or in_wall_check then return "timeout", "timeout" end
  if ok then return status, payload end
  -- Lua calls no message handler for out-of-memory errors.
  if not handled and status == "not enough memory" then return "memory", status end
  if find(status, CONVERT, 1, true) == 1 then return "convert", sub(status, #CONVERT + 1) end
  return "error", status
end

return run

