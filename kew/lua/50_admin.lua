--[[
Cancelling tasks, creating queues, pruning consumers.
]]

--[[
cancel: cancel a task. A queued, deferred or retry-waiting task ends at once
(task.cancelled); its ready entry, if any, is dropped by whoever reads it
next. A running task is asked to stop (task.cancel_requested): its consumer
cancels the attempt and records task.cancelled; if that consumer is gone, the
consumer that takes the entry over records it instead of running it.
KEYS: the queue's keys, then the task hash
ARGV: task id, actor, expiry seconds, finished channel, cancel channel
Returns {'cancelled'}, {'requested'}, {'finished', state} or {'missing'}.
]]
local function cancel(keys, args)
  local Q = queue(keys)
  local task = keys[QUEUE_KEYS + 1]
  local task_id, actor = args[1], args[2]
  local t = task_fields(task)
  if not t.state then
    return {'missing'}
  end
  if t.state == 'processing' then
    if not t.cancel_requested then
      local eid = append(Q.log, 'task.cancel_requested', task_id, t.last_event,
        t.attempt, actor, t.tp, '{}')
      redis.call('HSET', task, 'cancel_requested', '1', 'version', t.version + 1,
        'last_event', eid)
      redis.call('PUBLISH', args[5], task_id)
    end
    return {'requested'}
  end
  if t.state ~= 'queued' and t.state ~= 'scheduled' and t.state ~= 'retry' then
    return {'finished', t.state}
  end
  redis.call('ZREM', Q.sched, task_id)
  local eid = append(Q.log, 'task.cancelled', task_id, t.last_event, t.attempt,
    actor, t.tp, '{"reason":"cancelled before it ran"}')
  redis.call('HSET', task, 'state', 'cancelled', 'version', t.version + 1,
    'last_event', eid, 'finished_at', ms_of(eid))
  redis.call('HDEL', task, 'due_at')
  move(Q.stats, t.state, 'cancelled')
  ended(Q, task, task_id, eid, args[3], args[4])
  return {'cancelled'}
end

--[[
requeue: send dead-lettered tasks back to their ready streams, as new
attempts (task.requeued). A dead letter whose task record is gone, or whose
task is no longer dead-lettered, is dropped from the stream and counted apart.
KEYS: the queue's keys
ARGV: actor, task key prefix, how many at most
Returns {requeued, dropped}.
]]
local function requeue(keys, args)
  local Q = queue(keys)
  local actor, task_prefix = args[1], args[2]
  local requeued, dropped = 0, 0
  for _, entry in ipairs(redis.call('XRANGE', Q.dlq, '-', '+', 'COUNT', args[3])) do
    local task_id = fields_map(entry[2])['task_id'] or ''
    local task = task_prefix .. task_id
    local t = task_fields(task)
    local dead = redis.call('HGET', task, 'dead_letter')
    redis.call('XDEL', Q.dlq, entry[1])
    if t.state == 'failed' and dead == entry[1] then
      local priority = tonumber(redis.call('HGET', task, 'priority'))
      local rid = enqueue(Q.ready[priority], task_id, t.tp)
      local eid = append(Q.log, 'task.requeued', task_id, t.last_event, t.attempt,
        actor, t.tp, '{"entry":' .. json_string(rid) .. ',"dead_letter":' ..
        json_string(entry[1]) .. '}')
      redis.call('HSET', task, 'state', 'queued', 'version', t.version + 1,
        'last_event', eid)
      redis.call('HDEL', task, 'dead_letter', 'finished_at', 'refusals')
      redis.call('PERSIST', task)
      redis.call('HDEL', Q.ended, task_id)
      move(Q.stats, 'failed', 'queued')
      requeued = requeued + 1
    else
      dropped = dropped + 1
    end
  end
  return {requeued, dropped}
end

--[[
restore: rewrite task hashes from a rebuild, many per call (the writing half
of rebuild_projections; the folding half runs in Python).
KEYS: the queue's keys, then per task: task hash
ARGV: per task: ttl ms (-1: delete it, 0: no expiry), field count n, then n
      field/value pairs
Returns how many hashes were written.
]]
local function restore(keys, args)
  local pos, written = 1, 0
  for i = QUEUE_KEYS + 1, #keys do
    local task = keys[i]
    local ttl, n = tonumber(args[pos]), tonumber(args[pos + 1])
    redis.call('DEL', task)
    if ttl >= 0 then
      -- unpack straight from ARGV: copying the pairs into a table of their
      -- own first costs more than both writes.
      redis.call('HSET', task, unpack(args, pos + 2, pos + 1 + 2 * n))
      if ttl > 0 then
        redis.call('PEXPIRE', task, ttl)
      end
      written = written + 1
    end
    pos = pos + 2 + 2 * n
  end
  return written
end

--[[
trim: the last step of the retention policy, after the archive is written:
drop the head of the log below `floor` (XTRIM MINID, exact), forget the ended
tasks whose events went with it, and store the fold of what was trimmed.
It refuses if one of those tasks changed meanwhile (a dead letter requeued),
so nothing that a live task still needs is ever trimmed.
KEYS: the queue's keys, then the snapshot hash
ARGV: floor id, snapshot through, stats JSON, breaker JSON, events, then per
      trimmed task: task id, its last event id
Returns {'ok', entries trimmed} or {'moved', task id}.
]]
local function trim(keys, args)
  local Q = queue(keys)
  local snapshot = keys[QUEUE_KEYS + 1]
  for i = 6, #args, 2 do
    if redis.call('HGET', Q.ended, args[i]) ~= args[i + 1] then
      return {'moved', args[i]}
    end
  end
  local trimmed = redis.call('XTRIM', Q.log, 'MINID', args[1])
  for i = 6, #args, 2 do
    redis.call('HDEL', Q.ended, args[i])
  end
  redis.call('HSET', snapshot, 'through', args[2], 'stats', args[3],
    'breaker', args[4], 'events', args[5])
  return {'ok', trimmed}
end

--[[
create_queue: make the ready streams and their group, store the configuration.
KEYS: the queue's keys
ARGV: actor, configuration JSON, then field/value pairs for the config hash
Returns 'created', 'updated' or 'unchanged'.
]]
local function create_queue(keys, args)
  local Q = queue(keys)
  local old = redis.call('HGET', Q.config, 'json')
  for _, ready in ipairs(Q.ready) do
    redis.pcall('XGROUP', 'CREATE', ready, GROUP, '0', 'MKSTREAM')
  end
  if old == args[2] then
    return 'unchanged'
  end
  local fields = {'HSET', Q.config, 'json', args[2]}
  for i = 3, #args do
    fields[#fields + 1] = args[i]
  end
  redis.call(unpack(fields))
  append(Q.log, 'queue.configured', nil, nil, nil, args[1], nil,
    '{"config":' .. args[2] .. '}')
  if old then
    return 'updated'
  end
  return 'created'
end

--[[
prune: remove a consumer that is gone (no liveness key) and holds nothing.
KEYS: the queue's keys, then the consumer's worker key
ARGV: consumer
Returns 1 if it was removed. A consumer still holding an entry is kept:
deleting it would delete its pending entries with it.
]]
local function prune(keys, args)
  local Q = queue(keys)
  local consumer = args[1]
  if redis.call('EXISTS', keys[QUEUE_KEYS + 1]) == 1 then
    return 0
  end
  for _, ready in ipairs(Q.ready) do
    if #redis.call('XPENDING', ready, GROUP, '-', '+', 1, consumer) > 0 then
      return 0
    end
  end
  for _, ready in ipairs(Q.ready) do
    redis.pcall('XGROUP', 'DELCONSUMER', ready, GROUP, consumer)
  end
  return 1
end
