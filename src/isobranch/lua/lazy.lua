-- A lazily filled `state` for isobranch's sandbox (sandbox.lua loads it
-- with a VM's first lazy state, passing the library functions it needs, so
-- nothing user code did to the globals can reach it). Returns the
-- functions the sandbox's replacements of next, pairs, rawget, rawset,
-- getmetatable and setmetatable, its call loop and the encoder use.
--
-- `state` is a real Lua table. Its top-level values stay in Python until
-- first read: a shared metatable, LAZY_META, fills a key from Python on its
-- first read (__index) and forgets the pending value on a write to it
-- (__newindex). Once every key is filled the metatable is removed, so the
-- table is then plain in every way. User code never sees LAZY_META:
-- getmetatable answers nil for a lazy table, and everything that walks or
-- reads a table raw (next, pairs, rawget, setmetatable, the result encoder)
-- fills what it needs first. rawset drops the pending value it overwrites.
-- `#`, rawlen and ipairs need nothing: only states whose keys are all
-- strings are lazy, so the array part is never pending.
local type, error, unhooked, find, sub, raw_next, rawset, raw_setmetatable, CONVERT, get_decode,
  RECORDS = ...
-- The running call's callback into Python: fetch(i) gives the marshal bytes
-- of the i-th key's value, false if it cannot convert, nil if it would not
-- fit in the VM's max_memory.
local fetch

-- RECORDS (the sandbox's): lazy table -> its record: pending (key -> index
-- into the call's values), count (how many keys are still pending), call.
-- Weak keys: a state user code no longer reaches disappears from it at the
-- next collection, which is how the sandbox tells whether a state outlives
-- its call.
-- The first failed fill of this call: {index = i, message = m} or
-- {memory = true}. It is sticky: user code that catches the error still
-- ends with it.
local failure

-- Which call is running: a record belongs to one call, and only that
-- call's values can fill it.
local call_id = 0

local function fill(t, record, key, index)
  if record.call ~= call_id then error("isobranch: a state outlived its call", 0) end
  local data = fetch(index)
  if type(data) ~= "string" then
    if data == nil then
      failure = failure or {memory = true}
      error("not enough memory", 0)
    end
    failure = failure or {index = index, message = "cannot be converted"}
    error(CONVERT .. "state: a value cannot be converted to Lua", 0)
  end
  -- Depth 1: a top-level value sits one level below `state` itself.
  local ok, value = unhooked(get_decode(), data, 1)
  fetch(index, true)  -- decoded: Python's clock for this call runs again
  if not ok then
    if type(value) == "string" and find(value, CONVERT, 1, true) == 1 then
      failure = failure or {index = index, message = sub(value, #CONVERT + 1)}
    end
    error(value, 0)
  end
  record.pending[key] = nil
  record.count = record.count - 1
  rawset(t, key, value)
  if record.count == 0 then
    RECORDS[t] = nil
    raw_setmetatable(t, nil)
  end
  return value
end

local function fill_all(t)
  local record = RECORDS[t]
  if record == nil then return end
  for key, index in raw_next, record.pending do fill(t, record, key, index) end
end

local function drop_pending(t, record, key)
  if record.pending[key] ~= nil then
    record.pending[key] = nil
    record.count = record.count - 1
    if record.count == 0 then
      RECORDS[t] = nil
      raw_setmetatable(t, nil)
    end
  end
end

local LAZY_META = {
  __index = function(t, key)
    local record = RECORDS[t]
    local index = record and record.pending[key]
    if index == nil then return nil end
    return fill(t, record, key, index)
  end,
  __newindex = function(t, key, value)
    -- The messages Lua gives for a plain table, at the caller's line.
    if key == nil then error("index is nil", 2) end
    if key ~= key then error("index is NaN", 2) end
    local record = RECORDS[t]
    if record then drop_pending(t, record, key) end
    rawset(t, key, value)
  end,
}

local M = {}

-- A table whose keys are `keys` (a list of strings), each filled on first
-- read with the decoded value fetch(i) gives for keys[i].
function M.new_state(keys)
  local t, pending, count = {}, {}, 0
  for i = 1, #keys do
    if pending[keys[i]] == nil then count = count + 1 end
    pending[keys[i]] = i
  end
  if count == 0 then return t end
  RECORDS[t] = {pending = pending, count = count, call = call_id}
  return raw_setmetatable(t, LAZY_META)
end

M.fill_all = fill_all
M.any_pending = function() return raw_next(RECORDS) ~= nil end
function M.fill_every_state()
  for t in raw_next, RECORDS do fill_all(t) end
end
function M.begin_call(callback)
  call_id = call_id + 1
  fetch, failure = callback, nil
end
-- After a failed fill of a state that outlived its call: what it still
-- misses can never be filled, so it stops being lazy (the VM is discarded).
function M.abandon_all()
  for t in raw_next, RECORDS do
    RECORDS[t] = nil
    raw_setmetatable(t, nil)
  end
end
function M.take_failure()
  local f = failure
  failure = nil
  return f
end

-- For the sandbox's rawget and rawset: fill or forget one key.
function M.fill_key(t, key)
  local record = RECORDS[t]
  local index = record and record.pending[key]
  if index ~= nil then fill(t, record, key, index) end
end
function M.forget_key(t, key)
  local record = RECORDS[t]
  if record then drop_pending(t, record, key) end
end

return M
