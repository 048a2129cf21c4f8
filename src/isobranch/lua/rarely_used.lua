-- The sandbox's versions of the library functions most VMs never call:
-- pcall, xpcall and the coroutine functions that take or resume user code
-- (create, resume, wrap, close), load, collectgarbage, setmetatable,
-- getmetatable, rawget and rawset. sandbox.lua loads this chunk the first
-- time one of them is called (a VM is cheaper to create without them),
-- passing the library functions and the sandbox's own pieces they need, so
-- nothing user code did to the globals can reach them; its "time limit"
-- section explains the rules the protected calls keep. Returns the
-- functions by name.
local type, select, error, format, pcall, co_create, co_resume, co_status, co_close, co_running,
  load, raw_collect, getmetatable, setmetatable, rawget, rawset, WEAK_KEYS, check_after_error,
  refuse_when_out_of_time, hooked, LAZY, get_crossing = ...

local M = {}

-- Lua's own argument error of next, pairs, rawget and rawset, at the
-- caller's line. An error path only, so it lives here and not in every new
-- VM; sandbox.lua reads it by index (the same number there), not by a name
-- each VM would have to allocate.
local TABLE_EXPECTED <const> = 1
local function table_expected(name, ...)
  local got = select("#", ...) == 0 and "no value" or type((...))
  error("bad argument #1 to '" .. name .. "' (table expected, got " .. got .. ")", 3)
end
M[TABLE_EXPECTED] = table_expected

---------------------------------------------------------------- pcall
-- Protected calls nest at most MAX_PROTECTED_DEPTH deep on one thread.
-- Lua's C stack limit already stops them there, except in a coroutine that
-- yields inside them: each resume starts on a fresh C stack, so a coroutine
-- could pile up a hundred thousand. Once time is up each of them catches the
-- timeout once, and each catch costs Lua a walk over the whole call stack:
-- unwinding would take minutes. Depths are kept per thread as absolute
-- values, so a level whose return was skipped is corrected by the next one.
local MAX_PROTECTED_DEPTH <const> = 200
local protected_depth = setmetatable({}, WEAK_KEYS)
local function enter_protected()
  local thread = co_running()
  local depth = (protected_depth[thread] or 0) + 1
  if depth > MAX_PROTECTED_DEPTH then
    error(format("too many nested protected calls (pcall/xpcall) in one coroutine "
                 .. "(the sandbox allows %d)", MAX_PROTECTED_DEPTH), 3)
  end
  protected_depth[thread] = depth
  return thread, depth
end

local function after_pcall(thread, depth, ok, ...)
  protected_depth[thread] = depth - 1
  if not ok then check_after_error() end
  return ok, ...
end
function M.pcall(f, ...)
  local thread, depth = enter_protected()
  return after_pcall(thread, depth, pcall(f, ...))
end

---------------------------------------------------------------- xpcall
-- No user function is ever a message handler: Lua would run it with hooks
-- off after a hook error. The handler is called after unwinding, in a
-- protected call of ours, like Lua's own: a handler that raises is called
-- again with its own error, until the C stack runs out (about 200 times).
local HANDLER_CALLS = 200
local function handle(thread, depth, handler, err)
  -- The handler runs in a protected call one level below xpcall's.
  if depth >= MAX_PROTECTED_DEPTH then return "error in error handling" end
  for _ = 1, HANDLER_CALLS do
    protected_depth[thread] = depth + 1
    local ok, result = pcall(handler, err)
    protected_depth[thread] = depth
    if ok then return result end
    check_after_error()
    err = result
  end
  return "error in error handling"
end
local function after_xpcall(thread, depth, handler, ok, ...)
  if ok then
    protected_depth[thread] = depth - 1
    return ok, ...
  end
  check_after_error()
  local result = handle(thread, depth, handler, (...))
  protected_depth[thread] = depth - 1
  return false, result
end
function M.xpcall(f, ...)
  local handler = ...
  if type(handler) ~= "function" then
    local got = select("#", ...) == 0 and "no value" or type(handler)
    error("bad argument #2 to 'xpcall' (function expected, got " .. got .. ")", 2)
  end
  local thread, depth = enter_protected()
  return after_xpcall(thread, depth, handler, pcall(f, select(2, ...)))
end

---------------------------------------------------------------- coroutines
-- A coroutine's body runs inside a pcall of ours, which closes its <close>
-- variables with hooks on before it dies; each is hooked when it is made;
-- none is created, resumed or closed once time is up.
local function after_protected_call(ok, ...)
  if not ok then check_after_error() end
  return ok, ...
end
local function body_finished(ok, ...)
  if ok then return ... end
  check_after_error()
  error((...), 0)
end
local function new_coroutine(f, name)
  refuse_when_out_of_time()
  if type(f) ~= "function" then
    error("bad argument #1 to '" .. name .. "' (function expected, got " .. type(f) .. ")", 3)
  end
  return hooked(co_create(function(...) return body_finished(pcall(f, ...)) end))
end
function M.create(f)
  -- Not a tail call: new_coroutine raises at the level of create's caller.
  local co = new_coroutine(f, "create")
  return co
end
function M.resume(co, ...)
  refuse_when_out_of_time()
  return after_protected_call(co_resume(co, ...))
end
-- A wrapped coroutine's results, or its error raised at the caller of the
-- wrapper (this runs as the wrapper's tail call, in its place).
local function wrapped_results(co, ok, ...)
  if ok then return ... end
  check_after_error()
  local err = ...
  if co_status(co) == "dead" then
    -- Like the built-in wrap: close its <close> variables; their error wins.
    local closed, close_err = co_close(co)
    if not closed then err = close_err end
  end
  error(err, 2)
end
function M.wrap(f)
  local co = new_coroutine(f, "wrap")
  return function(...)
    refuse_when_out_of_time()
    return wrapped_results(co, co_resume(co, ...))
  end
end
function M.close(co)
  refuse_when_out_of_time()
  return after_protected_call(co_close(co))
end

---------------------------------------------------------------- load, collectgarbage
function M.load(chunk, name, mode, ...)
  -- Text only: a crafted binary chunk can crash the VM.
  local fn, err
  if select("#", ...) > 0 then
    fn, err = load(chunk, name, "t", (...))
  else
    fn, err = load(chunk, name, "t")
  end
  -- A failed load may be an error of its reader function that load caught.
  if fn == nil then check_after_error() end
  return fn, err
end
function M.collectgarbage(option)
  if option == "count" then return raw_collect("count") end
  error("collectgarbage: only \"count\" is available in the sandbox", 2)
end

---------------------------------------------------------------- setmetatable
function M.setmetatable(t, mt)
  -- Lua 5.4 runs finalizers with hooks disabled, so a looping __gc could
  -- never be stopped; objects are marked for finalization only here.
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc metamethods are not allowed in the sandbox", 2)
  end
  -- A lazy state becomes a plain table before it gets a metatable of its own.
  if LAZY[t] then get_crossing().fill_all(t) end
  return setmetatable(t, mt)
end

---------------------------------------------------------------- lazy state
-- getmetatable, rawget and rawset on a lazily filled state (sandbox.lua's
-- "crossing" section): a table in LAZY exists only once crossing.lua is
-- loaded.
function M.getmetatable(...)
  if select("#", ...) == 0 then error("bad argument #1 to 'getmetatable' (value expected)", 2) end
  local t = ...
  if LAZY[t] then return nil end
  return getmetatable(t)
end
function M.rawget(...)
  local t, key = ...
  if type(t) ~= "table" then table_expected("rawget", ...) end
  if LAZY[t] and select("#", ...) > 1 then get_crossing().fill_key(t, key) end
  return rawget(...)
end
function M.rawset(...)
  local t, key = ...
  if type(t) ~= "table" then table_expected("rawset", ...) end
  if LAZY[t] and select("#", ...) > 2 then get_crossing().forget_key(t, key) end
  return rawset(...)
end

return M
