--[[
Running tasks: promoting due ones, starting attempts, recording outcomes.
]]

-- Move due deferred tasks and retries from the schedule to their ready
-- streams (task.enqueued). Returns the next due time, or '' if none.
local function promote(Q, task_prefix, actor, now, limit)
  local due = redis.call('ZRANGEBYSCORE', Q.sched, '-inf', now, 'LIMIT', 0, limit)
  for _, task_id in ipairs(due) do
    redis.call('ZREM', Q.sched, task_id)
    local task = task_prefix .. task_id
    local t = redis.call('HMGET', task, 'state', 'version', 'last_event',
      'attempt', 'priority', 'tp')
    if t[1] == 'scheduled' or t[1] == 'retry' then
      local rid = enqueue(Q.ready[tonumber(t[5])], task_id, t[6])
      local eid = append(Q.log, 'task.enqueued', task_id, t[3], t[4], actor, t[6],
        '{"entry":' .. json_string(rid) .. ',"from":' .. json_string(t[1]) .. '}')
      redis.call('HSET', task, 'state', 'queued', 'version', tonumber(t[2]) + 1,
        'last_event', eid)
      redis.call('HDEL', task, 'due_at')
      move(Q.stats, t[1], 'queued')
    end
  end
  local head = redis.call('ZRANGE', Q.sched, 0, 0, 'WITHSCORES')
  return head[2] or ''
end

-- Hand an entry back as a fresh entry at the end of its stream.
local function hand_back(Q, ready, task, task_id, entry_id, t, actor, reason,
                         etype)
  drop_entry(Q, ready, entry_id)
  local new_entry = enqueue(ready, task_id, t.tp)
  local eid = append(Q.log, etype, task_id, t.last_event, t.attempt, actor, t.tp,
    '{"entry":' .. json_string(entry_id) .. ',"requeued_as":' ..
    json_string(new_entry) .. ',"reason":' .. json_string(reason) .. '}')
  redis.call('HSET', task, 'state', 'queued', 'version', t.version + 1,
    'last_event', eid)
  return eid
end

local function task_fields(task)
  local t = redis.call('HMGET', task, 'state', 'version', 'last_event',
    'attempt', 'name', 'args', 'owner', 'tp', 'trial', 'cancel_requested',
    'timeout_ms', 'entry')
  return {
    state = t[1], version = tonumber(t[2]), last_event = t[3], attempt = t[4],
    name = t[5], args = t[6], owner = t[7], tp = t[8], trial = t[9] == '1',
    cancel_requested = t[10] == '1', timeout_ms = t[11] or '0', entry = t[12],
  }
end

-- Record the end of a task that was asked to stop and has no attempt running
-- any more (its consumer is gone, or shut down before the attempt stopped):
-- task.cancelled.
local function cancelled_unrun(Q, cfg, task, task_id, t, actor, now, expiry,
                               channel, reason)
  local eid = append(Q.log, 'task.cancelled', task_id, t.last_event, t.attempt,
    actor, t.tp, '{"reason":' .. json_string(reason) .. '}')
  redis.call('HSET', task, 'state', 'cancelled', 'version', t.version + 1,
    'last_event', eid, 'finished_at', ms_of(eid))
  redis.call('HDEL', task, 'trial', 'cancel_requested')
  move(Q.stats, t.state, 'cancelled')
  if t.trial then
    breaker_outcome(Q, cfg, actor, now, 'released', false, true)
  end
  ended(Q, task, task_id, eid, expiry, channel)
end

--[[
Start one attempt of the task behind a ready entry this consumer now holds.
Called for entries read by `fetch` and taken over by `maintain`.

`reclaim` is nil for a fresh delivery, or {previous owner, idle ms,
deliveries} when the entry was taken over from a consumer that stopped
renewing it. `gate` is the breaker's (see breaker_gate); a trial slot is taken
from it. Returns a row:
  {'started', task_id, entry, attempt, version, name, args, tp, ready, timeout,
   deliveries}
where deliveries is the entry's delivery count (1 for a fresh delivery),
or {'skipped', task_id, entry, why} when nothing is to run: the entry is then
acknowledged and deleted (or handed back, if the breaker holds it).
]]
local function start_entry(Q, cfg, env, ready, task, task_id, entry_id, reclaim,
                           gate)
  local consumer, now = env.consumer, env.now
  local t = task_fields(task)
  if not t.state then
    drop_entry(Q, ready, entry_id)
    return {'skipped', task_id, entry_id, 'no task record'}
  end
  local reclaiming = reclaim ~= nil and t.state == 'processing'
  if reclaiming and t.cancel_requested then
    drop_entry(Q, ready, entry_id)
    cancelled_unrun(Q, cfg, task, task_id, t, consumer, now, env.expiry,
      env.channel, 'cancelled while its consumer was gone')
    return {'skipped', task_id, entry_id, 'task was cancelled'}
  end
  if t.state == 'processing' and t.entry == entry_id and not reclaiming then
    -- This very entry is the task's running attempt: never drop it.
    return {'skipped', task_id, entry_id, 'its attempt is running'}
  end
  if t.state ~= 'queued' and not reclaiming then
    drop_entry(Q, ready, entry_id)
    return {'skipped', task_id, entry_id, 'task is ' .. t.state}
  end

  local trial, new_trial = t.trial, false
  if gate.open or (gate.half_open and not trial and gate.room <= 0) then
    -- Not to run yet: back to the end of its stream, to wait for the breaker.
    if reclaiming then
      -- Only a task that is no trial gets here: maintain takes nothing over
      -- while the breaker is open (but what it cancels, which returns above),
      -- and a trial keeps its slot when taken over half-open.
      hand_back(Q, ready, task, task_id, entry_id, t, consumer,
        'its consumer stopped renewing and the circuit breaker holds it',
        'task.interrupted')
      move(Q.stats, 'processing', 'queued')
    else
      hand_back(Q, ready, task, task_id, entry_id, t, consumer,
        'the circuit breaker holds it', 'task.released')
    end
    return {'skipped', task_id, entry_id, 'the circuit breaker holds it'}
  end
  if gate.half_open and not trial then
    gate.room = gate.room - 1
    trial, new_trial = true, true
    breaker_take_trial(Q)
  end

  local version, prev = t.version, t.last_event
  if reclaiming then
    prev = append(Q.log, 'task.reclaimed', task_id, prev, t.attempt, consumer,
      t.tp, '{"previous":' .. json_string(t.owner) .. ',"entry":' ..
      json_string(entry_id) .. ',"idle_ms":' .. reclaim[2] .. '}')
    version = version + 1
  else
    move(Q.stats, 'queued', 'processing')
  end

  local attempt = tostring(tonumber(t.attempt) + 1)
  local data = '{"entry":' .. json_string(entry_id)
  if trial then
    data = data .. ',"trial":true'
  end
  local eid = append(Q.log, 'task.started', task_id, prev, attempt, consumer, t.tp,
    data .. '}')
  version = version + 1
  local set = {'state', 'processing', 'version', version, 'last_event', eid,
    'attempt', attempt, 'owner', consumer, 'entry', entry_id,
    'started_at', ms_of(eid)}
  if new_trial then
    set[#set + 1] = 'trial'
    set[#set + 1] = '1'
  end
  redis.call('HSET', task, unpack(set))
  redis.call('HSET', Q.pending, pending_field(Q, ready, entry_id), task_id)
  local deliveries = reclaim and reclaim[3] or 1
  return {'started', task_id, entry_id, attempt, tostring(version), t.name, t.args,
    t.tp or '', ready, t.timeout_ms, deliveries}
end

-- The newest entry id of each ready stream: a consumer that found nothing
-- waits (XREAD BLOCK, outside any group, claiming nothing) for entries after
-- these, so an entry added after this call is never missed.
local function last_ids(Q)
  local ids = {}
  for level = 1, 3 do
    local newest = redis.call('XREVRANGE', Q.ready[level], '+', '-', 'COUNT', 1)[1]
    ids[level] = newest and newest[1] or '0-0'
  end
  return ids
end

--[[
What to read, as {level, how many} steps: for a weighted order, the quota of
each level among the first `count` of the caller's picks (`picks`: one digit,
the level, per free slot, in the caller's smooth weighted round robin order),
then the rest in strict order. Only the first `count` picks count, so a read
capped below the caller's free slots (a half-open breaker's trial room) keeps
the weighted order: the caller is charged for those picks alone.
]]
local function read_plan(picks, count)
  local plan = {}
  if picks and picks ~= '' then
    local quotas = {0, 0, 0}
    for i = 1, math.min(#picks, count) do
      local level = tonumber(string.sub(picks, i, i))
      quotas[level] = quotas[level] + 1
    end
    for level = 1, 3 do
      plan[#plan + 1] = {level, quotas[level]}
    end
  end
  for level = 1, 3 do
    plan[#plan + 1] = {level, count}
  end
  return plan
end

--[[
fetch: promote due tasks, then read new entries and start them, as many as
the caller has free permits and the breaker allows.
KEYS: the queue's keys
ARGV: consumer, count, task key prefix, expiry seconds, finished channel,
      then optionally the picks of a weighted order (see read_plan)
Returns {rows, next due time or '', gate, server time, newest entry ids,
allowed, breaker transitions} where gate is '' (closed), 'open:<until ms>' or
'half_open:<n>' (n trial slots left free after this call), allowed is how many
entries the call could take (the count, capped by the breaker): the picks it
used, and the transitions are the states the breaker entered.
]]
local function fetch(keys, args)
  local Q = queue(keys)
  local cfg = settings(Q)
  local env = {consumer = args[1], now = now_ms(), expiry = args[4],
    channel = args[5]}
  local remaining, task_prefix = tonumber(args[2]), args[3]
  local next_due = promote(Q, task_prefix, env.consumer, env.now, 100)
  local gate = breaker_gate(Q, cfg, env.consumer, env.now)
  if gate.open then
    return {{}, next_due, 'open:' .. gate.until_ms, env.now, last_ids(Q), 0,
      Q.transitions}
  end
  if gate.half_open then
    remaining = math.min(remaining, gate.room)
  end
  local allowed = remaining

  local rows = {}
  for _, step in ipairs(read_plan(args[6], remaining)) do
    local want = math.min(step[2], remaining)
    if want > 0 then
      local ready = Q.ready[step[1]]
      local reply = redis.call('XREADGROUP', 'GROUP', GROUP, env.consumer,
        'COUNT', want, 'STREAMS', ready, '>')
      if reply then
        for _, entry in ipairs(reply[1][2]) do
          remaining = remaining - 1
          local task_id = fields_map(entry[2])['task_id']
          if task_id then
            rows[#rows + 1] = start_entry(Q, cfg, env, ready,
              task_prefix .. task_id, task_id, entry[1], nil, gate)
          else
            drop_entry(Q, ready, entry[1])
            rows[#rows + 1] = {'skipped', '', entry[1], 'entry has no task_id'}
          end
        end
      end
    end
  end
  local label = ''
  if gate.half_open then
    label = 'half_open:' .. gate.room
  end
  return {rows, next_due, label, env.now, last_ids(Q), allowed, Q.transitions}
end

local FINISH_ARGS = 9

--[[
finish: record the outcome of attempts, fenced.
KEYS: the queue's keys, then per attempt: task hash
ARGV: consumer, expiry seconds, finished channel, then per attempt:
      task id, entry id, level, attempt, version, outcome, value, data, jitter
outcome is 'succeeded' (value: the result's JSON), 'failed' (value: the
error) or 'cancelled'. jitter, in [0, 1), spreads retries.
A failed attempt of a task that was asked to cancel ends it `cancelled`
(task.cancelled, with the error), whatever retries are left: the function may
have turned the cancellation into an error of its own, or failed before its
consumer heard of the request. A success still completes the task.
An attempt is recorded only if this consumer still owns it: the task is
processing under this consumer, with the same attempt and entry, and the
pending entry's owner is this consumer (XACK alone checks none of that). The
version may have moved on: a cancel request adds an event while the attempt
runs, and does not make its outcome stale. (`version` is still passed, for the
log line of a refusal.) Returns per
attempt {'ok', event id, new state, due time of a retry or '', breaker} or
{'fenced', why}, where breaker is the state the attempt's outcome moved the
breaker to, or ''.
]]
local function finish(keys, args)
  local Q = queue(keys)
  local cfg = settings(Q)
  local consumer, expiry, channel = args[1], args[2], args[3]
  local now = now_ms()
  local rows = {}
  for i = 1, #keys - QUEUE_KEYS do
    local task = keys[QUEUE_KEYS + i]
    local a = {}
    for j = 1, FINISH_ARGS do
      a[j] = args[3 + (i - 1) * FINISH_ARGS + j]
    end
    local task_id, entry_id, ready = a[1], a[2], Q.ready[tonumber(a[3])]
    local attempt, version, outcome, value, data = a[4], a[5], a[6], a[7], a[8]

    local t = redis.call('HMGET', task, 'state', 'version', 'last_event',
      'attempt', 'owner', 'entry', 'tp', 'trial', 'max_retries',
      'retry_delay_ms', 'retries', 'cancel_requested')
    local why = nil
    if t[1] ~= 'processing' or t[4] ~= attempt or t[5] ~= consumer
        or t[6] ~= entry_id then
      why = 'task is ' .. tostring(t[1]) .. ' at version ' .. tostring(t[2]) ..
        ' (attempt ' .. attempt .. ' was at ' .. version .. '), attempt ' ..
        tostring(t[4]) .. ' of ' .. tostring(t[5])
    else
      local p = redis.call('XPENDING', ready, GROUP, entry_id, entry_id, 1)[1]
      if not p or p[2] ~= consumer then
        why = 'entry is pending at ' .. tostring(p and p[2])
      end
    end

    if why then
      rows[#rows + 1] = {'fenced', why}
    else
      local trial, tp = t[8] == '1', t[7]
      if outcome == 'failed' and t[12] == '1' then
        outcome = 'cancelled'
        data = '{"reason":"cancel_task",' .. string.sub(data, 2)
      end
      -- Retries are counted apart from attempts: an attempt handed back or
      -- taken over (task.interrupted, task.reclaimed) ends without a failure
      -- and uses up no retry.
      local retries = tonumber(t[11]) or 0
      local retry = outcome == 'failed' and retries < tonumber(t[9] or '0')
      local state, eid, due
      local transitions = #Q.transitions
      -- The task's fields are set, and cleared, in one command each at the end.
      local set, clear = {}, {'trial', 'cancel_requested'}
      drop_entry(Q, ready, entry_id)
      if outcome == 'succeeded' then
        state = 'completed'
        eid = append(Q.log, 'task.succeeded', task_id, t[3], attempt, consumer, tp,
          data)
        set = {'result', value}
        clear[#clear + 1] = 'error'
        breaker_outcome(Q, cfg, consumer, now, 'succeeded', true, trial, tp)
      elseif outcome == 'cancelled' then
        state = 'cancelled'
        eid = append(Q.log, 'task.cancelled', task_id, t[3], attempt, consumer, tp,
          data)
        if trial then
          breaker_outcome(Q, cfg, consumer, now, 'released', false, true)
        end
      else
        eid = append(Q.log, 'task.failed', task_id, t[3], attempt, consumer, tp,
          string.sub(data, 1, -2) .. ',"retry":' .. tostring(retry) .. '}')
        set = {'error', value}
        breaker_outcome(Q, cfg, consumer, now, 'failed', not retry, trial, tp)
        state = 'failed'
        if retry then
          state = 'retry'
          local delay = tonumber(t[10]) * 2 ^ retries
          delay = math.min(delay, cfg.max_retry_delay_ms)
          delay = math.floor(delay * (0.5 + 0.5 * tonumber(a[9])))
          due = now + delay
          eid = append(Q.log, 'task.retry_scheduled', task_id, eid, attempt,
            consumer, tp, '{"due_at":' .. due .. ',"delay_ms":' .. delay .. '}')
          set[#set + 1] = 'due_at'
          set[#set + 1] = due
          set[#set + 1] = 'retries'
          set[#set + 1] = retries + 1
          redis.call('ZADD', Q.sched, due, task_id)
        end
      end
      local extra = 1
      if retry then
        extra = 2
      end
      set[#set + 1] = 'state'
      set[#set + 1] = state
      set[#set + 1] = 'version'
      set[#set + 1] = tonumber(t[2]) + extra
      set[#set + 1] = 'last_event'
      set[#set + 1] = eid
      if not retry then
        set[#set + 1] = 'finished_at'
        set[#set + 1] = ms_of(eid)
      end
      redis.call('HSET', task, unpack(set))
      redis.call('HDEL', task, unpack(clear))
      move(Q.stats, 'processing', state)
      if not retry then
        ended(Q, task, task_id, eid, expiry, channel)
      end
      rows[#rows + 1] = {'ok', eid, state, due or '',
        Q.transitions[transitions + 1] or ''}
    end
  end
  return rows
end
