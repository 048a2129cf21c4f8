-- How values cross a call of isobranch's sandbox: decoding the call's
-- input, encoding a table result, and the lazily filled state. sandbox.lua
-- loads it the first time a call brings a table or returns one (a VM that
-- only ever sees scalars never does), passing the library functions and the
-- sandbox's own pieces it needs, so nothing user code did to the globals
-- can reach it. It loads the codec (decode.lua, encode.lua) and lazy.lua in
-- turn, each when first needed. Returns its functions: by index for the
-- sandbox (the numbers at the end of this file), by name for
-- rarely_used.lua.
local type, next, error, tostring, rawget, rawset, rawlen, setmetatable, math_type, format, sub,
  byte, char, find, concat, unpack_string, pack_string, load, pcall, raw_collect, CONVERT,
  MAX_DEPTH, DEPTH_REASON, LAZY, check_time, unhooked, decode_bytecode, encode_bytecode,
  lazy_bytecode = ...

local M = {}
-- The call statuses this returns (sandbox.lua and runtime.py's _Status
-- give the same numbers).
local FAILED <const> = 3; local OUT_OF_MEMORY <const> = 6; local CONVERT_INPUT <const> = 7
local CONVERT_ESCAPED <const> = 8

-- Which Python container a decoded table came from (decode.lua explains).
local KIND = setmetatable({}, {__mode = "k"})
local decoder, encoder, lazy
local function fill_all(t) lazy.fill_all(t) end
local function load_codec(bytecode, name)
  -- An empty environment: the codec sees only what it is given.
  return load(bytecode, name, "b", {})({
    type = type, next = next, error = error, tostring = tostring, pcall = pcall, rawget = rawget,
    rawlen = rawlen, setmetatable = setmetatable, math_type = math_type, format = format,
    sub = sub, byte = byte, char = char, concat = concat, unpack_string = unpack_string,
    pack_string = pack_string, CONVERT = CONVERT, MAX_DEPTH = MAX_DEPTH,
    DEPTH_REASON = DEPTH_REASON, KIND = KIND, LAZY = LAZY, fill_lazy = fill_all,
    check_time = check_time,
  })
end
local function get_decode()
  if decoder == nil then decoder = load_codec(decode_bytecode, "=isobranch/decode") end
  return decoder
end
local function get_encode()
  if encoder == nil then encoder = load_codec(encode_bytecode, "=isobranch/encode") end
  return encoder
end

local function decode_failed(err)
  raw_collect("restart")
  if find(err, CONVERT, 1, true) == 1 then return CONVERT_INPUT, sub(err, #CONVERT + 1) end
  if err == "not enough memory" then return OUT_OF_MEMORY, err end
  return FAILED, err
end

-- A call's input: nil, state, variables; or a failure's status and message.
-- A lazy state arrives as the list of its keys; values come on first read.
function M.decode_inputs(state_data, variables_data, lazy_state)
  -- Decoding builds many tables at once: the collector would only slow it.
  raw_collect("stop")
  local ok, state, variables
  if state_data then
    ok, state = pcall(get_decode(), state_data)
    if not ok then return decode_failed(state) end
    if lazy_state then state = lazy.new_state(state) end
  end
  if variables_data then
    ok, variables = pcall(get_decode(), variables_data)
    if not ok then return decode_failed(variables) end
  end
  raw_collect("restart")
  return nil, state, variables
end

-- A table result as marshal bytes: ok, bytes (or false, the error).
-- Encoding runs no user code (raw access only), so like decoding it runs
-- unhooked, with the collector paused (it makes little garbage).
function M.encode_result(result)
  return unhooked(get_encode(), result)
end

-- The global interrupt(value) of node calls: value and answer cross as a
-- one-element list, through ask, the Python callable the runtime gives.
-- Made here, not in the sandbox, so that a VM that never pauses does not
-- load it.
function M.make_interrupt(ask)
  return function(value)
    local ok, encoded = M.encode_result({value})
    if not ok then error(encoded, 2) end
    local failure, answer = M.decode_inputs(ask(encoded), nil, false)
    if failure then error(answer, 2) end
    return answer[1]
  end
end

---------------------------------------------------------------- lazy state
-- The running call's state is lazy (its values come through fetch).
function M.begin_call(fetch)
  if lazy == nil then
    lazy = load(lazy_bytecode, "=isobranch/lazy", "b", {})(
      type, error, unhooked, find, sub, next, rawset, setmetatable, CONVERT,
      get_decode, LAZY)
  end
  lazy.begin_call(fetch)
end

-- For the sandbox's next, pairs, rawget, rawset and setmetatable: a table
-- in LAZY exists only once lazy.lua is loaded.
M.fill_all = fill_all
function M.fill_key(t, key) lazy.fill_key(t, key) end
function M.forget_key(t, key) lazy.forget_key(t, key) end

-- The first failed fill of the call that just ended, if any: true, whether
-- it ran out of memory, its message and the index of its key.
local function take_failure()
  local failed = lazy.take_failure()
  if failed then return true, failed.memory, failed.message, failed.index end
  return false
end

-- Only the value of this call is in Python: a lazy state still reachable
-- after the call (kept in a global, say) is filled now, or a later call
-- would read another call's values. One full collection tells. Returns
-- nothing, or a failure's status, message and the index of its key.
function M.fill_escaped_states()
  if not lazy.any_pending() then return nil end
  raw_collect("collect")
  if not lazy.any_pending() then return nil end
  raw_collect("stop")
  local ok, err = pcall(lazy.fill_every_state)
  raw_collect("restart")
  local failed = lazy.take_failure()
  if ok then return nil end
  lazy.abandon_all()
  if failed and failed.memory then return OUT_OF_MEMORY, "not enough memory" end
  if failed then return CONVERT_ESCAPED, failed.message, failed.index end
  local status, message = decode_failed(err)
  return status == CONVERT_INPUT and CONVERT_ESCAPED or status, message
end

-- For the sandbox, by index (sandbox.lua names the same numbers).
M[1], M[2], M[3], M[4] = M.decode_inputs, M.encode_result, M.make_interrupt, M.begin_call
M[5], M[6], M[7] = fill_all, take_failure, M.fill_escaped_states
return M
