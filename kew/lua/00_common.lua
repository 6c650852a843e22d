#!lua name=__LIB__
--[[
kew's write paths, one Redis Function each. The files of kew/lua are joined in
name order into one library; this one holds what the others share.

Invariants every function keeps:

* A function appends its event(s) to the queue's log and updates the inline
  projections (task hash, stats hash, breaker hash) in the same call, so they
  never diverge.
* Check first, write last: Redis has no rollback, so every check that can
  refuse the call runs before the first write.
* A transition verifies the task's expected state (and, when the caller knows
  it, its version, attempt and owner) before it writes; a stale caller is told
  so and changes nothing.
* Keys are declared in KEYS, except the task hashes of entries that `fetch`,
  `maintain`, `release` and the promotion of due tasks find in a stream or the
  schedule: their ids are unknown until then. Those keys are built from the
  queue's task prefix and share its hash tag, so they live in the queue's
  Cluster slot.
* Time comes from the server: an event's time is its entry id, and the hashes
  store those milliseconds, so a fold of the log yields the same hashes (JSON
  fields compare by value). Decisions that need the clock (due tasks, the
  breaker's timeout) use TIME and leave an event behind.
* Randomness (retry jitter) comes from the caller, so functions are
  deterministic for a given input.

Every function takes the queue's keys first, in this order (see `queue`):
log, stats, config, breaker, sched, ready:high, ready:medium, ready:low, dlq,
ended, pending.

The Python mirror of what these functions write is kew/projections/.
]]

local GROUP = '__GROUP__'
--[[
Added to an entry's idle time (XCLAIM IDLE) to make it reclaimable by anyone
at once; whoever reclaims it subtracts it again, so the idle time it records
is still the time since the entry's last delivery. 10^12 ms is 31 years: no
real idle time comes near it, and the delivery time it implies stays after
1970 (Redis would clamp an earlier one to now).
]]
local IDLE_MARK = 1000000000000
local LEVELS = {'high', 'medium', 'low'}
local UNFINISHED = {'queued', 'scheduled', 'retry', 'processing'}
local QUEUE_KEYS = 11

-- The queue's keys, and `transitions`: the states the breaker entered during
-- this call, in order (see breaker_event).
local function queue(keys)
  return {
    log = keys[1], stats = keys[2], config = keys[3], breaker = keys[4],
    sched = keys[5], ready = {keys[6], keys[7], keys[8]}, dlq = keys[9],
    ended = keys[10], pending = keys[11], transitions = {},
  }
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function ms_of(id)
  return string.match(id, '^(%d+)')
end

--[[
The schema version of each event type this library writes (the `v` field).
It must equal the VERSION of the type's model in kew/events/models.py
(tests/test_log.py checks that it does, for every type): a change to the
fields of a type bumps both, and adds an upcaster for the old shape to
kew/events/codec.py.
]]
local VERSIONS = {
  ['task.submitted'] = '1',
  ['task.enqueued'] = '1',
  ['task.started'] = '1',
  ['task.succeeded'] = '1',
  ['task.failed'] = '1',
  ['task.retry_scheduled'] = '1',
  ['task.cancel_requested'] = '1',
  ['task.cancelled'] = '1',
  ['task.reclaimed'] = '1',
  ['task.interrupted'] = '1',
  ['task.released'] = '1',
  ['task.dead_lettered'] = '1',
  ['task.refused'] = '1',
  ['task.requeued'] = '1',
  ['task.lost'] = '1',
  ['breaker.opened'] = '1',
  ['breaker.half_opened'] = '1',
  ['breaker.closed'] = '1',
  ['queue.configured'] = '1',
}

-- Append one event. Empty optional fields are left out of the entry.
local function append(log, etype, task_id, prev, attempt, actor, tp, data)
  local version = VERSIONS[etype]
  if not version then
    -- A bug in this library, never a caller's mistake: refuse before writing.
    error('kew: event type ' .. etype .. ' has no schema version in VERSIONS')
  end
  local cmd = {'XADD', log, '*', 'type', etype, 'v', version}
  local function put(name, value)
    if value ~= nil and value ~= false and value ~= '' then
      cmd[#cmd + 1] = name
      cmd[#cmd + 1] = value
    end
  end
  put('task_id', task_id)
  put('prev', prev)
  put('attempt', attempt)
  put('actor', actor)
  put('tp', tp)
  put('data', data)
  return redis.call(unpack(cmd))
end

local function fields_map(flat)
  local map = {}
  if flat then
    for i = 1, #flat, 2 do
      map[flat[i]] = flat[i + 1]
    end
  end
  return map
end

local function json_string(value)
  return cjson.encode(value or '')
end

local function settings(Q)
  local c = redis.call('HMGET', Q.config, 'max_size',
    'circuit_breaker_max_failures', 'circuit_breaker_reset_timeout',
    'circuit_breaker_trials', 'max_retry_delay', 'max_deliveries',
    'lease_seconds')
  local lease = tonumber(c[7])
  return {
    max_size = tonumber(c[1]) or 0,
    max_failures = tonumber(c[2]) or 3,
    reset_ms = math.floor((tonumber(c[3]) or 60) * 1000),
    trials = tonumber(c[4]) or 1,
    max_retry_delay_ms = math.floor((tonumber(c[5]) or 3600) * 1000),
    max_deliveries = tonumber(c[6]) or 5,
    -- nil for a configuration stored before the lease was: the caller's
    -- own lease applies then.
    lease_ms = lease and math.floor(lease * 1000),
  }
end

local function unfinished(stats)
  local c = redis.call('HMGET', stats, unpack(UNFINISHED))
  local n = 0
  for i = 1, #UNFINISHED do
    n = n + (tonumber(c[i]) or 0)
  end
  return n
end

--[[
What one call has read or changed, kept until its end (see `per_call`):
`moves`, per stats hash, the net change of each state's count, written once
at the end (a fetch of 100 tasks makes 2 HINCRBY, not 200); `breakers`, each
breaker hash as read, so a call that records 100 outcomes reads it once (every
change goes through breaker_write, which keeps this copy current).
]]
local moves, breakers = {}, {}

-- Count a task out of one state and into another (written at the call's end).
local function move(stats, from, to)
  local m = moves[stats]
  if not m then
    m = {}
    moves[stats] = m
  end
  if from then
    m[from] = (m[from] or 0) - 1
  end
  if to then
    m[to] = (m[to] or 0) + 1
  end
end

--[[
Wrap a function that writes: it starts with nothing kept from an earlier call
(one that raised an error may have left something), and its counts are written
when it returns. Only `submit` reads counts (`unfinished`), before it moves any.
A call that raises an error loses its count changes while its other writes
stand; only a bug in this library raises after the first write (every check
runs first), and `verify` then reports the counts and `rebuild` repairs them.
]]
local function per_call(fn)
  return function(keys, args)
    moves, breakers = {}, {}
    local reply = fn(keys, args)
    for stats, m in pairs(moves) do
      for state, delta in pairs(m) do
        if delta ~= 0 then
          redis.call('HINCRBY', stats, state, delta)
        end
      end
    end
    moves, breakers = {}, {}
    return reply
  end
end

-- XCLAIM `ids` to `consumer` with min-idle 0 (it owns them already), then
-- the options, e.g. IDLE and JUSTID. Returns the set of the ids claimed: an
-- id missing from it was deleted from the stream, and XCLAIM (Redis 7.0+,
-- Valkey) has dropped it from the pending list without a word.
local function claim(ready, consumer, ids, options)
  local claimed = {}
  if #ids == 0 then
    return claimed
  end
  local cmd = {'XCLAIM', ready, GROUP, consumer, '0'}
  for _, id in ipairs(ids) do
    cmd[#cmd + 1] = id
  end
  for _, option in ipairs(options) do
    cmd[#cmd + 1] = option
  end
  for _, id in ipairs(redis.call(unpack(cmd))) do
    claimed[id] = true
  end
  return claimed
end

--[[
The pending index (`Q.pending`, a hash) names the task of every ready entry
a consumer holds: '<level>:<entry id>' -> task id, set when an attempt starts
on the entry and removed when the entry is dropped. An entry deleted from its
stream (by hand, or a trim) while pending takes its task id with it; the
index still names the task, so that it can be logged and run again.
]]
local function pending_field(Q, ready, entry_id)
  for level = 1, 3 do
    if Q.ready[level] == ready then
      return LEVELS[level] .. ':' .. entry_id
    end
  end
  return ready .. ':' .. entry_id
end

local function drop_entry(Q, ready, entry_id)
  redis.call('XACK', ready, GROUP, entry_id)
  redis.call('XDEL', ready, entry_id)
  redis.call('HDEL', Q.pending, pending_field(Q, ready, entry_id))
end

-- A new ready entry for a task, at the end of its stream.
local function enqueue(ready, task_id, tp)
  if tp and tp ~= '' then
    return redis.call('XADD', ready, '*', 'task_id', task_id, 'tp', tp)
  end
  return redis.call('XADD', ready, '*', 'task_id', task_id)
end

-- The end of a task: its record expires `expiry` seconds from now (unless
-- `expiry` is false: a dead letter waits to be requeued), its last event is
-- indexed so its history outlives the record, and whoever waits is told.
local function ended(Q, task, task_id, last_event, expiry, channel)
  if expiry then
    redis.call('EXPIRE', task, expiry)
  end
  redis.call('HSET', Q.ended, task_id, last_event)
  redis.call('PUBLISH', channel, task_id)
end
