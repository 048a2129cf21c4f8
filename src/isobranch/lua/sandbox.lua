-- Sandbox for one isobranch Lua VM, precompiled once per process. It runs
-- once per VM, before any user code, and returns the function the runtime
-- calls for every execution. Everything a VM may never use is loaded on
-- first use, which keeps VM creation cheap: the library functions most VMs
-- never call (rarely_used.lua), and how values cross a call (crossing.lua,
-- which loads decode.lua, encode.lua and the lazy state's lazy.lua).
-- Everything the engine needs is captured here as a local upvalue, so user
-- code that replaces or mutates globals cannot reach or break it. No table
-- that user code can see carries a metatable of ours that it can reach (a
-- lazy state's is hidden by getmetatable, see below): a reachable marker
-- metatable could be given __gc or __newindex and run user code where no
-- hook can stop it.
local wall_check, hook_count, crossing_bytecode, decode_bytecode, encode_bytecode, lazy_bytecode,
  rarely_used_bytecode, on_armed, max_depth, depth_reason = ...

local type, next, select, error = type, next, select, error
local rawget, rawset, rawequal = rawget, rawset, rawequal
local setmetatable, getmetatable, load, xpcall, pcall = setmetatable, getmetatable, load, xpcall,
  pcall
local pairs = pairs
local find, format, sub = string.find, string.format, string.sub
local co_running = coroutine.running
local sethook, getinfo = debug.sethook, debug.getinfo
local clock, wall_second = os.clock, os.time
local raw_collect = collectgarbage
local G = _G
local CONVERT <const> = "isobranch.convert: "
-- A call's mode and result status are small integers, not strings: each
-- distinct string constant costs a new VM an allocation when it is loaded.
-- runtime.py's _Mode and _Status give the same numbers (and crossing.lua's
-- statuses). One declaration each: only the last constant of a multiple
-- declaration is folded at compile time.
local MODE_NODE <const> = 2; local MODE_CONDITION <const> = 3
local OK <const> = 1; local SCALAR <const> = 2; local FAILED <const> = 3
local CONVERT_FAILED <const> = 4; local TIMED_OUT <const> = 5; local OUT_OF_MEMORY <const> = 6
local CONVERT_INPUT <const> = 7
local WEAK_KEYS, WEAK_VALUES = {__mode = "k"}, {__mode = "v"}
-- What only the chunks loaded on first use need, in one array that
-- sandbox() captures as one variable instead of one per piece: each
-- variable sandbox() captures costs a new VM an allocation and a longer
-- walk of this chunk's open upvalues (these 19 were 6% of creating a VM;
-- in a table with named fields their names cost nearly as much).
local FOR_FIRST_USE = {crossing_bytecode, decode_bytecode, encode_bytecode, lazy_bytecode,
  rarely_used_bytecode, max_depth, depth_reason, tostring, rawlen, math.type, string.byte,
  string.char, string.unpack, string.pack, table.concat, coroutine.create, coroutine.resume,
  coroutine.status, coroutine.close}
-- Its indexes: one declaration each (only the last constant of a multiple
-- declaration is folded at compile time; the others would be captured).
local CROSSING_BC <const> = 1; local DECODE_BC <const> = 2; local ENCODE_BC <const> = 3
local LAZY_BC <const> = 4; local RARELY_USED_BC <const> = 5; local MAX_DEPTH <const> = 6
local DEPTH_REASON <const> = 7; local TOSTRING <const> = 8; local RAWLEN <const> = 9
local MATH_TYPE <const> = 10; local BYTE <const> = 11; local CHAR <const> = 12
local UNPACK_STRING <const> = 13; local PACK_STRING <const> = 14; local CONCAT <const> = 15
local CO_CREATE <const> = 16; local CO_RESUME <const> = 17; local CO_STATUS <const> = 18
local CO_CLOSE <const> = 19

-- The rest is made inside sandbox(), not in this main chunk. Making a
-- closure links every local it captures from the running function by
-- walking that function's list of open upvalues, and nearly every closure
-- below captures some of the library functions above: inside sandbox()
-- they are its upvalues, which a closure shares without a walk. In the main
-- chunk those walks were a tenth of the time it takes to create a VM.
-- (The body of sandbox() is not indented: it is the rest of the file.)
local function sandbox()
---------------------------------------------------------------- time limit
-- A count hook reads the process CPU clock and asks Python for the wall
-- clock only once per CPU_SLICE of CPU: a running Lua program always burns
-- CPU, so this never delays the check by more than a slice, and Lua runs
-- without the GIL in between.
--
-- Reading that clock is a system call that cost a hot loop a third of its
-- time, so the hook reads it at every CLOCK_EVERY-th firing, and at every
-- firing after a sign that the interval may have been costly: a collector
-- cycle ended (the canary, a table only a weak table holds, is gone), or
-- the wall clock's second changed (os.time, which reads no system call).
-- Costly instructions nearly all allocate (copying, concatenating,
-- building strings and tables), and allocating drives the collector: a
-- program that turns from cheap instructions to such costly ones is
-- still looked at after one interval of them, as when the clock was read
-- at every firing. What allocates nothing (comparing or scanning huge
-- strings, shifting a huge table) may run CLOCK_EVERY intervals, at most
-- until the second changes.
local TIMEOUT = setmetatable({}, {__name = "isobranch.timeout", __metatable = false})
local CPU_SLICE <const> = 0.005
local CLOCK_EVERY <const> = 8
-- Firings since the clock was last read; the canary's holder (made at the
-- first firing: most VMs never fire) and the second of that reading.
local unclocked, canary, clocked_second = 0, false, false
-- armed: a call is running. expired: its deadline passed. in_wall_check:
-- stays true if an error (out of memory, say) escaped the hook's Python
-- call, which leaves hooks off on that thread; it is treated as expired.
-- slice_start: the CPU clock when the call last asked Python, false until
-- its first clock reading (which asks at once: a call too short to fire the
-- hook reads no clock at all).
local armed, expired, in_wall_check, slice_start = false, false, false, false

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

-- Asks Python whether the deadline has passed (or the call was cancelled).
-- The hook may fire inside this function when a wrapper below calls it, so
-- only the hook's own call marks in_wall_check; a wrapper catches a failed
-- Python call (out of memory) itself, and it counts as time being up too.
local function ask_wall_clock(now, from_hook)
  slice_start = now
  local answered, past
  if from_hook then
    in_wall_check = true
    answered, past = true, wall_check()
    in_wall_check = false
  else
    answered, past = pcall(wall_check)
  end
  if past or not answered then expire() end
end

local function check_time()
  if expired or in_wall_check then expire() end
  local now = clock()
  if not slice_start or now - slice_start >= CPU_SLICE then ask_wall_clock(now, false) end
end

local run
-- Runs every hook_count instructions of a hot loop: it stays this short.
hook = function()
  if not armed then return end
  if expired or in_wall_check then
    -- Once time is up the hook fires on every instruction, the sandbox's
    -- own too: run() must be able to finish the call it made.
    if expired and getinfo(2, "f").func == run then return end
    expire()
  end
  unclocked = unclocked + 1
  if unclocked < CLOCK_EVERY and canary and canary[1] and wall_second() == clocked_second then
    return
  end
  unclocked = 0
  if not canary then canary = setmetatable({}, WEAK_VALUES) end
  if not canary[1] then canary[1] = {} end
  clocked_second = wall_second()
  local now = clock()
  if not slice_start or now - slice_start >= CPU_SLICE then ask_wall_clock(now, true) end
end

-- A new coroutine inherits the C side of the hook but not the debug
-- library's Lua function, so each one must be hooked explicitly.
local function hooked(co)
  if hook_count then sethook(co, hook, "", expired and 1 or hook_count) end
  return co
end

-- Calling the hook is itself a call that can fail before any line of it
-- runs: at Lua's C stack limit ("C stack overflow", "error in error
-- handling"), at the Lua stack limit, or out of memory. Such a failure is an
-- ordinary error, raised where the hook fired, so two rules follow.
--
-- 1. Lua turns hooks off on a thread while its hook runs and leaves them off
--    when the hook raises, until a protected call catches the error (that
--    call restores the value it saw when it started). No user code may run
--    in that window, or it runs unhooked, and every protected call it starts
--    would restore "off" again. The window runs message handlers and, on a
--    coroutine that died there, its <close> variables when it is closed. So
--    no user function is ever a message handler (rarely_used.lua's xpcall
--    calls the handler after unwinding), and a coroutine's body runs inside
--    a pcall of ours, which closes its <close> variables with hooks on
--    before it dies.
-- 2. A program that makes every hook fire at the C stack limit would never
--    have its deadline checked. Each failed hook call raises an error that a
--    protected call catches, and every protected call user code can make is
--    a wrapper in rarely_used.lua (pcall, xpcall, load, coroutine
--    resume/wrap/close, a coroutine's body), each of which checks the clock
--    after a caught error.
local function check_after_error()
  if hook_count and armed then check_time() end
end

-- Each thread has its own hook counter, so a coroutine that has not run
-- since time was up still has up to hook_count instructions before its hook
-- fires. Creating, resuming or closing a coroutine is therefore refused once
-- time is up: only threads already on the resume chain (bounded by Lua's C
-- stack limit) can still run, each until its own hook fires once.
local function refuse_when_out_of_time()
  if expired or in_wall_check then expire() end
end

---------------------------------------------------------------- sandbox
if package and package.loaded then package.loaded.python = nil end
G.python = nil
G.io, G.debug, G.package, G.require, G.dofile, G.loadfile = nil, nil, nil, nil, nil, nil
G.os = {time = os.time, clock = os.clock, date = os.date}
string.dump = nil
---------------------------------------------------------------- crossing
-- Decoding a lazy state's value is the sandbox's own bounded work, as when
-- a whole state was decoded before the call: it runs with the collector
-- paused and no count hook (a hooked loop runs 2-2.5x slower), and the
-- codec checks the clock itself. Only our code runs meanwhile.
local unhooked_now = false
local function unhooked(fn, a, b)
  if unhooked_now then return pcall(fn, a, b) end
  local collecting = raw_collect("isrunning")
  if collecting then raw_collect("stop") end
  local thread = co_running()
  local hooked_now = hook_count and armed
  if hooked_now then sethook(thread) end
  unhooked_now = true
  local ok, value = pcall(fn, a, b)
  unhooked_now = false
  if hooked_now then sethook(thread, hook, "", expired and 1 or hook_count) end
  if collecting then raw_collect("restart") end
  return ok, value
end

-- A state whose top-level values are filled on first read (lazy.lua). LAZY
-- maps each such table to its record. The only globals that could tell it
-- from a plain table are next and pairs below, and setmetatable,
-- getmetatable, rawget and rawset (rarely_used.lua): each fills what it
-- touches first.
local LAZY = setmetatable({}, WEAK_KEYS)
-- crossing.lua, loaded with the first call that brings or returns a table.
-- Its functions are read by index (the same numbers there): a field name
-- would be one more string constant for every new VM to allocate.
local crossing
local DECODE_INPUTS <const> = 1; local ENCODE_RESULT <const> = 2
local MAKE_INTERRUPT <const> = 3; local BEGIN_CALL <const> = 4; local FILL_ALL <const> = 5
local TAKE_FAILURE <const> = 6; local FILL_ESCAPED_STATES <const> = 7
local function get_crossing()
  if crossing == nil then
    local lib = FOR_FIRST_USE
    crossing = load(lib[CROSSING_BC], "=isobranch/crossing", "b", {})(
      type, next, error, lib[TOSTRING], rawget, rawset, lib[RAWLEN], setmetatable,
      lib[MATH_TYPE], format, sub, lib[BYTE], lib[CHAR], find, lib[CONCAT], lib[UNPACK_STRING],
      lib[PACK_STRING], load, pcall, raw_collect, CONVERT, lib[MAX_DEPTH], lib[DEPTH_REASON],
      LAZY, check_after_error, unhooked, lib[DECODE_BC], lib[ENCODE_BC], lib[LAZY_BC])
  end
  return crossing
end

-- The library functions most VMs never call live in rarely_used.lua,
-- loaded the first time one of them is called: a stub per function
-- tail-calls the real one, so error levels and results are the same.
-- Loading runs none of the caller's code, and a load interrupted by the
-- time limit or memory leaves nothing half-made: the next call loads again.
local rarely_used
local function get_rarely_used()
  if rarely_used == nil then
    local lib = FOR_FIRST_USE
    rarely_used = load(lib[RARELY_USED_BC], "=isobranch/rarely_used", "b", {})(
      type, select, error, format, pcall, lib[CO_CREATE], lib[CO_RESUME], lib[CO_STATUS],
      lib[CO_CLOSE], co_running, load, raw_collect, getmetatable, setmetatable, rawget, rawset,
      WEAK_KEYS, check_after_error, refuse_when_out_of_time, hooked, LAZY, get_crossing)
  end
  return rarely_used
end
-- Lua's own argument error, raised by rarely_used.lua's function at this
-- index (an error path: no VM pays for it until it fails that way).
local TABLE_EXPECTED <const> = 1
local function safe_next(...)
  local t = ...
  if type(t) ~= "table" then get_rarely_used()[TABLE_EXPECTED]("next", ...) end
  if LAZY[t] then crossing[FILL_ALL](t) end
  return next(...)
end
G.next = safe_next
G.pairs = function(...)
  local t = ...
  if type(t) ~= "table" then
    local mt = getmetatable(t)
    if type(mt) ~= "table" or rawget(mt, "__pairs") == nil then
      get_rarely_used()[TABLE_EXPECTED]("pairs", ...)
    end
  elseif LAZY[t] then
    crossing[FILL_ALL](t)
  end
  local iterator, subject, control = pairs(...)
  -- pairs hands out next: it must be this one, not the raw one.
  if iterator == next then iterator = safe_next end
  return iterator, subject, control
end
local function loaded_on_first_call(name)
  return function(...) return get_rarely_used()[name](...) end
end
G.pcall = loaded_on_first_call("pcall")
G.xpcall = loaded_on_first_call("xpcall")
G.setmetatable = loaded_on_first_call("setmetatable")
G.load = loaded_on_first_call("load")
G.collectgarbage = loaded_on_first_call("collectgarbage")
G.getmetatable = loaded_on_first_call("getmetatable")
G.rawget = loaded_on_first_call("rawget")
G.rawset = loaded_on_first_call("rawset")
local coroutine_lib = G.coroutine
coroutine_lib.create = loaded_on_first_call("create")
coroutine_lib.resume = loaded_on_first_call("resume")
coroutine_lib.wrap = loaded_on_first_call("wrap")
coroutine_lib.close = loaded_on_first_call("close")
-- Protect the string metatable: ("").x reaches the string table through it.
getmetatable("").__metatable = false

---------------------------------------------------------------- calls
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
    local ok, encoded = get_crossing()[ENCODE_RESULT](result)
    if not ok then error(encoded, 0) end
    return OK, encoded
  end
  if kind == "function" or kind == "thread" or kind == "userdata" then
    error(CONVERT .. "result: cannot convert a Lua " .. kind .. " to Python", 0)
  end
  return SCALAR, result
end

local NODE_PREFIX = "local state, variables = ...; "

-- The global interrupt(value) of node calls (crossing.lua makes it, with
-- the Python callable the runtime gives once per VM).
local interrupt_global

-- Modes: execute (state is a global, returns the chunk's value), MODE_NODE
-- (state and variables are locals), MODE_CONDITION (an expression).
-- Returns a status (OK, SCALAR, FAILED, CONVERT_FAILED, TIMED_OUT,
-- OUT_OF_MEMORY, CONVERT_INPUT, or crossing.lua's CONVERT_ESCAPED) and a
-- payload.
function run(mode, code, chunk_name, state_data, variables_data, lazy_state)
  local ok, state, variables
  if state_data or variables_data then
    local failure
    failure, state, variables = get_crossing()[DECODE_INPUTS](state_data, variables_data,
                                                                 lazy_state)
    -- A failure comes with its message.
    if failure then return failure, state end
  end
  local fn, err
  if mode == MODE_NODE then
    -- Same line as the user's first line, so line numbers stay right.
    fn, err = load(NODE_PREFIX .. code, chunk_name, "t", G)
  elseif mode == MODE_CONDITION then
    fn = load("return " .. code, chunk_name, "t", G)
    if not fn then fn, err = load(code, chunk_name, "t", G) end
  else
    fn, err = load(code, chunk_name, "t", G)
  end
  if not fn then
    if err == "not enough memory" then return OUT_OF_MEMORY, err end
    return FAILED, err
  end
  -- rawset: a metatable user code put on _G must not run before the hook is armed.
  rawset(G, "variables", variables)
  if mode ~= MODE_NODE then rawset(G, "state", state) end
  rawset(G, "interrupt", mode == MODE_NODE and interrupt_global or nil)
  handled, expired, in_wall_check, slice_start = false, false, false, false
  armed = true
  -- An outside watchdog (a worker's parent) times the call from here on,
  -- after the input has been decoded, as the hook does.
  if on_armed then on_armed() end
  if hook_count then sethook(hook, "", hook_count) end
  local status, payload
  ok, status, payload = xpcall(call_and_encode, on_error, fn, state, variables)
  armed = false
  if hook_count then sethook() end
  -- The collector runs again if an error escaped a stretch that paused it,
  -- and only then: a restart makes the next allocation do a collector step,
  -- a microsecond or two on every call.
  if not raw_collect("isrunning") then raw_collect("restart") end
  if expired or in_wall_check then return TIMED_OUT, "timeout" end
  if lazy_state then
    local failed, memory, message, index = crossing[TAKE_FAILURE]()
    if memory then return OUT_OF_MEMORY, "not enough memory" end
    if failed then return CONVERT_INPUT, message, index end
  end
  if ok then return status, payload end
  -- Lua calls no message handler for out-of-memory errors.
  if not handled and status == "not enough memory" then return OUT_OF_MEMORY, status end
  if find(status, CONVERT, 1, true) == 1 then return CONVERT_FAILED, sub(status, #CONVERT + 1) end
  return FAILED, status
end

-- The call the runtime makes: run() in its own frame, so that once it has
-- returned nothing on this stack still holds the call's state.
-- fetch (a lazy state's callback) is given only with a lazy state; ask (what
-- interrupt() calls) once, with a VM's first node call under a run.
return function(mode, code, chunk_name, state_data, variables_data, fetch, ask)
  if ask ~= nil then interrupt_global = get_crossing()[MAKE_INTERRUPT](ask) end
  local lazy_state = fetch ~= nil
  if lazy_state then get_crossing()[BEGIN_CALL](fetch) end
  local status, payload, index = run(mode, code, chunk_name, state_data, variables_data,
                                     lazy_state)
  -- After a timeout or a memory error the VM is thrown away.
  if lazy_state and status ~= TIMED_OUT and status ~= OUT_OF_MEMORY then
    rawset(G, "state", nil)
    local escaped_status, escaped_payload, escaped_index = crossing[FILL_ESCAPED_STATES]()
    if escaped_status then return escaped_status, escaped_payload, escaped_index end
  end
  return status, payload, index
end
end -- of sandbox()

return sandbox()
