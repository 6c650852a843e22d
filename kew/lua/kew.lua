#!lua name=__LIB__
--[[
kew's write paths, one Redis Function each.

Invariants every function keeps:

* A function appends its event(s) to the queue's log and updates the inline
  projections (task hash, stats hash) in the same call, so they never diverge.
* Check first, write last: Redis has no rollback, so every check that can
  refuse the call runs before the first write.
* A transition verifies the task's expected state (and, when the caller knows
  it, its version, attempt and owner) before it writes; a stale caller is told
  so and changes nothing.
* Keys are declared in KEYS, except the task hashes of entries that `fetch` and
  `maintain` read from a stream: their ids are unknown until the read. Those
  keys are built from the queue's task prefix and share its hash tag, so they
  live in the queue's Cluster slot.
* Time comes from the server: an event's time is its entry id, and the task
  hash stores those milliseconds, so a rebuild from the log yields the same
  hash byte for byte (JSON fields compare by value).

The Python side of each function is in kew/functions.py and kew/consumer.py;
the fold that mirrors what these functions write is kew/projections/task.py.
]]

local GROUP = '__GROUP__'
-- An idle time that makes an entry reclaimable by anyone at once.
local IDLE_NOW = '1000000000'

local function ms_of(id)
  return string.match(id, '^(%d+)')
end

-- Append one event. Empty optional fields are left out of the entry.
local function append(log, etype, task_id, prev, attempt, actor, tp, data)
  local cmd = {'XADD', log, '*', 'type', etype, 'v', '1'}
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

local function unfinished(stats)
  local c = redis.call('HMGET', stats, 'queued', 'processing', 'retry')
  return (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0)
end

-- XCLAIM `ids` to `consumer` with min-idle 0 (it owns them already), then
-- the options, e.g. IDLE and JUSTID.
local function claim(ready, consumer, ids, options)
  if #ids == 0 then
    return
  end
  local cmd = {'XCLAIM', ready, GROUP, consumer, '0'}
  for _, id in ipairs(ids) do
    cmd[#cmd + 1] = id
  end
  for _, option in ipairs(options) do
    cmd[#cmd + 1] = option
  end
  redis.call(unpack(cmd))
end

local function drop_entry(ready, entry_id)
  redis.call('XACK', ready, GROUP, entry_id)
  redis.call('XDEL', ready, entry_id)
end

--[[
Start one attempt of the task behind a ready entry this consumer now holds.

`reclaim` is nil for a fresh delivery, or {previous owner, idle ms} when the
entry was taken over from a consumer that stopped renewing it. Returns a row:
  {'started', task_id, entry, attempt, version, name, args, tp, ready}
or, when nothing is to run, {'skipped', task_id, entry, why} (the entry is
acknowledged and deleted so nobody runs it).
]]
local function start_entry(log, stats, ready, task, task_id, consumer, entry_id,
                           reclaim)
  local t = redis.call('HMGET', task, 'state', 'version', 'last_event',
    'attempt', 'name', 'args', 'owner', 'tp')
  local state = t[1]
  if not state then
    drop_entry(ready, entry_id)
    return {'skipped', task_id, entry_id, 'no task record'}
  end
  local reclaiming = reclaim ~= nil and state == 'processing'
  if state ~= 'queued' and not reclaiming then
    drop_entry(ready, entry_id)
    return {'skipped', task_id, entry_id, 'task is ' .. state}
  end

  local version = tonumber(t[2])
  local prev = t[3]
  local tp = t[8]
  if reclaiming then
    prev = append(log, 'task.reclaimed', task_id, prev, t[4], consumer, tp,
      '{"previous":' .. json_string(t[7]) .. ',"entry":' ..
      json_string(entry_id) .. ',"idle_ms":' .. reclaim[2] .. '}')
    version = version + 1
  else
    redis.call('HINCRBY', stats, 'queued', -1)
    redis.call('HINCRBY', stats, 'processing', 1)
  end

  local attempt = tostring(tonumber(t[4]) + 1)
  local eid = append(log, 'task.started', task_id, prev, attempt, consumer, tp,
    '{"entry":' .. json_string(entry_id) .. '}')
  version = version + 1
  redis.call('HSET', task, 'state', 'processing', 'version', version,
    'last_event', eid, 'attempt', attempt, 'owner', consumer,
    'entry', entry_id, 'started_at', ms_of(eid))
  return {'started', task_id, entry_id, attempt, tostring(version), t[5], t[6],
    tp or '', ready}
end

--[[
submit: add tasks to the queue, all or nothing.
KEYS: log, stats, config, then per task: task hash, ready stream
ARGV: actor, then per task: task_id, name, task_type, priority, args, data, tp
Returns {'ok', event id, entry id, ...} per task in order, or
{'noqueue'}, {'exists', id, ...}, {'duplicate', id, ...}, {'full', n, max}.
]]
local function submit(keys, args)
  local log, stats, config = keys[1], keys[2], keys[3]
  local actor = args[1]
  local n = (#keys - 3) / 2

  local existing, seen, repeated = {}, {}, {}
  for i = 1, n do
    local task, ready = keys[2 + 2 * i], keys[3 + 2 * i]
    local task_id = args[2 + (i - 1) * 7]
    if redis.call('EXISTS', ready) == 0 then
      return {'noqueue'}
    end
    if seen[task_id] then
      repeated[#repeated + 1] = task_id
    end
    seen[task_id] = true
    if redis.call('EXISTS', task) == 1 then
      existing[#existing + 1] = task_id
    end
  end
  if #repeated > 0 then
    return {'duplicate', unpack(repeated)}
  end
  if #existing > 0 then
    return {'exists', unpack(existing)}
  end
  local max_size = tonumber(redis.call('HGET', config, 'max_size') or '0')
  local count = unfinished(stats)
  if max_size > 0 and count + n > max_size then
    return {'full', count, max_size}
  end

  local reply = {'ok'}
  for i = 1, n do
    local task, ready = keys[2 + 2 * i], keys[3 + 2 * i]
    local base = 1 + (i - 1) * 7
    local task_id, name, task_type, priority = args[base + 1], args[base + 2],
      args[base + 3], args[base + 4]
    local task_args, data, tp = args[base + 5], args[base + 6], args[base + 7]
    local eid = append(log, 'task.submitted', task_id, nil, '0', actor, tp, data)
    redis.call('HSET', task, 'state', 'queued', 'version', '1',
      'last_event', eid, 'name', name, 'task_type', task_type,
      'priority', priority, 'args', task_args, 'attempt', '0',
      'submitted_at', ms_of(eid))
    if tp ~= '' then
      redis.call('HSET', task, 'tp', tp)
    end
    local rid
    if tp ~= '' then
      rid = redis.call('XADD', ready, '*', 'task_id', task_id, 'tp', tp)
    else
      rid = redis.call('XADD', ready, '*', 'task_id', task_id)
    end
    reply[#reply + 1] = eid
    reply[#reply + 1] = rid
  end
  redis.call('HINCRBY', stats, 'queued', n)
  return reply
end

--[[
fetch: read new entries, most urgent level first, and start them.
KEYS: log, stats, then the ready streams in the order to read them
ARGV: consumer, count, task key prefix
Returns a list of rows (see start_entry).
]]
local function fetch(keys, args)
  local log, stats = keys[1], keys[2]
  local consumer, remaining, task_prefix = args[1], tonumber(args[2]), args[3]
  local rows = {}
  for i = 3, #keys do
    if remaining <= 0 then
      break
    end
    local ready = keys[i]
    local reply = redis.call('XREADGROUP', 'GROUP', GROUP, consumer,
      'COUNT', remaining, 'STREAMS', ready, '>')
    if reply then
      for _, entry in ipairs(reply[1][2]) do
        remaining = remaining - 1
        local task_id = fields_map(entry[2])['task_id']
        if task_id then
          rows[#rows + 1] = start_entry(log, stats, ready, task_prefix .. task_id,
            task_id, consumer, entry[1], nil)
        else
          drop_entry(ready, entry[1])
          rows[#rows + 1] = {'skipped', '', entry[1], 'entry has no task_id'}
        end
      end
    end
  end
  return rows
end

--[[
start: start entries this consumer received from a blocking read.
KEYS: log, stats, then per entry: ready stream, task hash
ARGV: consumer, then per entry: entry id, task id
]]
local function start(keys, args)
  local log, stats = keys[1], keys[2]
  local consumer = args[1]
  local rows = {}
  for i = 1, (#keys - 2) / 2 do
    rows[#rows + 1] = start_entry(log, stats, keys[1 + 2 * i], keys[2 + 2 * i],
      args[1 + 2 * i], consumer, args[2 * i], nil)
  end
  return rows
end

--[[
finish: record the outcome of attempts, fenced.
KEYS: log, stats, then per attempt: ready stream, task hash
ARGV: consumer, expiry seconds, channel, then per attempt:
      task id, entry id, attempt, version, outcome, value, data
An attempt is recorded only if this consumer still owns it: the task is
processing under this consumer, attempt and version unchanged, and the pending
entry's owner is this consumer (XACK alone checks none of that). Returns per
attempt {'ok', event id} or {'fenced', why}.
]]
local function finish(keys, args)
  local log, stats = keys[1], keys[2]
  local consumer, expiry, channel = args[1], args[2], args[3]
  local rows = {}
  for i = 1, (#keys - 2) / 2 do
    local ready, task = keys[1 + 2 * i], keys[2 + 2 * i]
    local base = 3 + (i - 1) * 7
    local task_id, entry_id, attempt, version = args[base + 1], args[base + 2],
      args[base + 3], args[base + 4]
    local outcome, value, data = args[base + 5], args[base + 6], args[base + 7]

    local t = redis.call('HMGET', task, 'state', 'version', 'last_event',
      'attempt', 'owner', 'entry', 'tp')
    local why = nil
    if t[1] ~= 'processing' or t[2] ~= version or t[4] ~= attempt
        or t[5] ~= consumer or t[6] ~= entry_id then
      why = 'task is ' .. tostring(t[1]) .. ' at version ' .. tostring(t[2]) ..
        ', attempt ' .. tostring(t[4]) .. ' of ' .. tostring(t[5])
    else
      local p = redis.call('XPENDING', ready, GROUP, entry_id, entry_id, 1)[1]
      if not p or p[2] ~= consumer then
        why = 'entry is pending at ' .. tostring(p and p[2])
      end
    end

    if why then
      rows[#rows + 1] = {'fenced', why}
    else
      local etype, state, field, counter
      if outcome == 'succeeded' then
        etype, state, field, counter = 'task.succeeded', 'completed', 'result',
          'completed'
      else
        etype, state, field, counter = 'task.failed', 'failed', 'error', 'failed'
      end
      local eid = append(log, etype, task_id, t[3], attempt, consumer, t[7], data)
      redis.call('HSET', task, 'state', state, 'version', tonumber(version) + 1,
        'last_event', eid, field, value, 'finished_at', ms_of(eid))
      redis.call('EXPIRE', task, expiry)
      drop_entry(ready, entry_id)
      redis.call('HINCRBY', stats, 'processing', -1)
      redis.call('HINCRBY', stats, counter, 1)
      redis.call('PUBLISH', channel, task_id)
      rows[#rows + 1] = {'ok', eid}
    end
  end
  return rows
end

--[[
maintain: a consumer's periodic call. Refreshes its liveness key, renews the
lease on every entry it holds, and takes over entries whose lease lapsed.
KEYS: log, stats, worker key, then the ready streams (high, medium, low)
ARGV: consumer, lease ms, liveness ttl ms, liveness value, task key prefix,
      how many entries it may take over, then per ready stream:
      a count n followed by n held entry ids
Returns {lost ids, rows}: held entries now owned by someone else, and the rows
(see start_entry) of attempts taken over.
]]
local function maintain(keys, args)
  local log, stats, worker = keys[1], keys[2], keys[3]
  local consumer, lease = args[1], args[2]
  local task_prefix, room = args[5], tonumber(args[6])
  redis.call('SET', worker, args[4], 'PX', args[3])

  local lost, rows = {}, {}
  local pos = 7
  for k = 4, #keys do
    local ready = keys[k]
    local n = tonumber(args[pos])
    local held = {}
    for j = 1, n do
      held[args[pos + j]] = true
    end
    pos = pos + n + 1

    -- Renew what is still ours; report what is not. An entry of ours that
    -- this consumer does not know of (a read whose reply was lost) is made
    -- idle at once, so that the reclaim below, or another consumer, runs it.
    local mine, renew, stray = {}, {}, {}
    for _, p in ipairs(redis.call('XPENDING', ready, GROUP, '-', '+', 1000000,
        consumer)) do
      mine[p[1]] = true
      if held[p[1]] then
        renew[#renew + 1] = p[1]
      else
        stray[#stray + 1] = p[1]
      end
    end
    for id in pairs(held) do
      if not mine[id] then
        lost[#lost + 1] = id
      end
    end
    -- JUSTID: a renewal must not count as a delivery.
    claim(ready, consumer, renew, {'JUSTID'})
    claim(ready, consumer, stray, {'IDLE', IDLE_NOW, 'JUSTID'})

    if room > 0 then
      local idle = redis.call('XPENDING', ready, GROUP, 'IDLE', lease, '-', '+',
        room)
      for _, p in ipairs(idle) do
        local entry_id, owner, idle_ms = p[1], p[2], p[3]
        local claimed = redis.call('XCLAIM', ready, GROUP, consumer, lease,
          entry_id)
        room = room - 1
        if #claimed == 0 or not claimed[1][2] then
          append(log, 'task.lost', nil, nil, nil, consumer, nil,
            '{"entry":' .. json_string(entry_id) .. ',"stream":' ..
            json_string(ready) .. ',"previous":' .. json_string(owner) .. '}')
        else
          local task_id = fields_map(claimed[1][2])['task_id']
          rows[#rows + 1] = start_entry(log, stats, ready, task_prefix .. task_id,
            task_id, consumer, entry_id, {owner, idle_ms})
        end
      end
    end
  end
  return {lost, rows}
end

--[[
release: hand back every entry this consumer holds, so that others take them
at once instead of after the lease: each task goes back to the end of its
ready stream under a new entry. An attempt that was running is recorded as
`task.interrupted` (the next consumer starts the next attempt); an entry that
was fetched but never started as `task.released`.
KEYS: log, stats, then the ready streams
ARGV: consumer, task key prefix, reason
Returns how many tasks were handed back.
]]
local function release(keys, args)
  local log, stats = keys[1], keys[2]
  local consumer, task_prefix, reason = args[1], args[2], args[3]
  local count = 0
  for k = 3, #keys do
    local ready = keys[k]
    for _, p in ipairs(redis.call('XPENDING', ready, GROUP, '-', '+', 1000000,
        consumer)) do
      local entry_id = p[1]
      local entry = redis.call('XRANGE', ready, entry_id, entry_id)[1]
      drop_entry(ready, entry_id)
      local task_id = entry and fields_map(entry[2])['task_id']
      if task_id then
        local task = task_prefix .. task_id
        local t = redis.call('HMGET', task, 'state', 'version', 'last_event',
          'attempt', 'owner', 'tp')
        local running = t[1] == 'processing' and t[5] == consumer
        if t[1] == 'queued' or running then
          local tp = t[6]
          local new_entry
          if tp then
            new_entry = redis.call('XADD', ready, '*', 'task_id', task_id, 'tp', tp)
          else
            new_entry = redis.call('XADD', ready, '*', 'task_id', task_id)
          end
          local etype = 'task.released'
          if running then
            etype = 'task.interrupted'
            redis.call('HINCRBY', stats, 'processing', -1)
            redis.call('HINCRBY', stats, 'queued', 1)
          end
          local eid = append(log, etype, task_id, t[3], t[4], consumer, tp,
            '{"entry":' .. json_string(entry_id) .. ',"requeued_as":' ..
            json_string(new_entry) .. ',"reason":' .. json_string(reason) .. '}')
          redis.call('HSET', task, 'state', 'queued', 'version',
            tonumber(t[2]) + 1, 'last_event', eid)
          count = count + 1
        end
      end
    end
  end
  return count
end

--[[
create_queue: make the ready streams and their group, store the configuration.
KEYS: log, config, then the ready streams
ARGV: actor, configuration JSON, then field/value pairs for the config hash
Returns 'created', 'updated' or 'unchanged'.
]]
local function create_queue(keys, args)
  local log, config = keys[1], keys[2]
  local old = redis.call('HGET', config, 'json')
  for i = 3, #keys do
    redis.pcall('XGROUP', 'CREATE', keys[i], GROUP, '0', 'MKSTREAM')
  end
  if old == args[2] then
    return 'unchanged'
  end
  local fields = {'HSET', config, 'json', args[2]}
  for i = 3, #args do
    fields[#fields + 1] = args[i]
  end
  redis.call(unpack(fields))
  append(log, 'queue.configured', nil, nil, nil, args[1], nil,
    '{"config":' .. args[2] .. '}')
  if old then
    return 'updated'
  end
  return 'created'
end

--[[
prune: remove a consumer that is gone (no liveness key) and holds nothing.
KEYS: worker key, then the ready streams
ARGV: consumer
Returns how many streams it was removed from. A consumer still holding an
entry is kept: deleting it would delete its pending entries with it.
]]
local function prune(keys, args)
  local consumer = args[1]
  if redis.call('EXISTS', keys[1]) == 1 then
    return 0
  end
  for i = 2, #keys do
    if #redis.call('XPENDING', keys[i], GROUP, '-', '+', 1, consumer) > 0 then
      return 0
    end
  end
  local removed = 0
  for i = 2, #keys do
    if redis.pcall('XGROUP', 'DELCONSUMER', keys[i], GROUP, consumer) ~= nil then
      removed = removed + 1
    end
  end
  return removed
end

redis.register_function('__LIB___submit', submit)
redis.register_function('__LIB___fetch', fetch)
redis.register_function('__LIB___start', start)
redis.register_function('__LIB___finish', finish)
redis.register_function('__LIB___maintain', maintain)
redis.register_function('__LIB___release', release)
redis.register_function('__LIB___create_queue', create_queue)
redis.register_function('__LIB___prune', prune)
