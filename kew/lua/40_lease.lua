--[[
Leases: a consumer renews what it holds, takes over what others let lapse, and
hands back what it will not finish.
]]

--[[
A crash loop: an entry delivered more than max_deliveries times without an
outcome (each time its consumer died, or froze past its lease). Its task goes
to the dead-letter stream and ends `failed`; its record does not expire, so
`requeue` can send it back. It counts as a final failure for the breaker.

With `refused` (the name of the task's function), the task was instead
handed back max_deliveries times by consumers that do not have its function
(see `refuse`): dead-lettered the same way, with cause `unknown_function`,
but not counted by the breaker, which judges the task's work, not a
consumer's configuration.
]]
local function dead_letter(Q, cfg, env, ready, task, task_id, entry_id,
                           deliveries, owner, refused)
  drop_entry(Q, ready, entry_id)
  local t = task_fields(task)
  if t.state ~= 'processing' and t.state ~= 'queued' then
    return
  end
  local cause = 'crash_loop'
  local reason = 'delivered ' .. deliveries .. ' times without an outcome ' ..
    '(max_deliveries=' .. cfg.max_deliveries .. '): its consumers died or ' ..
    'froze while running it'
  if refused then
    cause = 'unknown_function'
    reason = 'handed back ' .. deliveries .. ' times (max_deliveries=' ..
      cfg.max_deliveries .. ') by consumers that do not have its task ' ..
      'function ' .. json_string(refused) .. ': run a worker that imports ' ..
      'the module defining it (kew worker --import MODULE), then requeue it'
  end
  local dlq_entry = redis.call('XADD', Q.dlq, '*', 'task_id', task_id,
    'entry', entry_id, 'deliveries', deliveries, 'previous', owner or '',
    'reason', reason)
  local eid = append(Q.log, 'task.dead_lettered', task_id, t.last_event,
    t.attempt, env.consumer, t.tp, '{"reason":' .. json_string(reason) ..
    ',"deliveries":' .. deliveries .. ',"entry":' .. json_string(entry_id) ..
    ',"dead_letter":' .. json_string(dlq_entry) .. ',"previous":' ..
    json_string(owner) .. ',"cause":' .. json_string(cause) .. '}')
  redis.call('HSET', task, 'state', 'failed', 'version', t.version + 1,
    'last_event', eid, 'error', reason, 'finished_at', ms_of(eid),
    'dead_letter', dlq_entry)
  redis.call('HDEL', task, 'trial', 'cancel_requested')
  move(Q.stats, t.state, 'failed')
  if refused then
    breaker_outcome(Q, cfg, env.consumer, env.now, 'released', false, t.trial)
  else
    breaker_outcome(Q, cfg, env.consumer, env.now, 'failed', true, t.trial,
      t.tp)
  end
  ended(Q, task, task_id, eid, false, env.channel)
  env.dead_lettered = (env.dead_lettered or 0) + 1
end

--[[
A pending entry gone from its stream: deleted by hand (XDEL) or trimmed while
a consumer held it. XCLAIM has already dropped it from the pending list
(Redis 7.0+ and Valkey do so without an error: a JUSTID renewal leaves it out
of its reply, a takeover gets nothing back); `release` finds it missing with
XRANGE. It is acknowledged, in case it is still pending, and logged as
`task.lost`, never dropped in silence.

Its task is the one the caller names (a consumer knows the task of every
entry it runs), else the one the pending index names. The task record holds
everything an attempt needs (the entry only pointed at it), so a task that
was running on that entry goes back to the queue under a new entry
(`requeued_as`, state queued): its next attempt runs wherever a consumer is
free, as after an interrupted attempt, and uses up no retry. A task asked to
cancel ends cancelled instead. A task that had moved on only gets the event
in its history; an unknown one (an entry started before kew kept the index)
an event without a task id.

`previous` is the consumer that held the entry; `env.consumer` noticed.
]]
local function lost_entry(Q, cfg, env, ready, entry_id, previous, task_id)
  task_id = task_id or redis.call('HGET', Q.pending,
    pending_field(Q, ready, entry_id))
  drop_entry(Q, ready, entry_id)
  local data = '{"entry":' .. json_string(entry_id) .. ',"stream":' ..
    json_string(ready) .. ',"previous":' .. json_string(previous)
  local task = task_id and env.task_prefix .. task_id
  local t = task and task_fields(task)
  if not (t and t.state) then
    append(Q.log, 'task.lost', nil, nil, nil, env.consumer, nil, data .. '}')
    return
  end

  local running = t.state == 'processing' and t.entry == entry_id
  local new_entry = nil
  if running and not t.cancel_requested then
    new_entry = enqueue(ready, task_id, t.tp)
    data = data .. ',"requeued_as":' .. json_string(new_entry)
  end
  local eid = append(Q.log, 'task.lost', task_id, t.last_event, t.attempt,
    env.consumer, t.tp, data .. '}')
  t.version, t.last_event = t.version + 1, eid
  redis.call('HSET', task, 'version', t.version, 'last_event', eid)
  if new_entry then
    redis.call('HSET', task, 'state', 'queued')
    move(Q.stats, 'processing', 'queued')
    if t.trial then
      redis.call('HDEL', task, 'trial')
      breaker_outcome(Q, cfg, env.consumer, env.now, 'released', false, true)
    end
  elseif running then
    cancelled_unrun(Q, cfg, task, task_id, t, env.consumer, env.now, env.expiry,
      env.channel, 'its entry was lost while it was asked to cancel')
  end
end

--[[
Renew the lease on the entries this consumer holds in one ready stream.
`held` maps each entry id it runs to its task id. Appends to `lost` a row
for each held entry it no longer holds: {entry id, 'taken over'} when it is
no longer pending under this consumer (another consumer took it over, or
`finish` acknowledged it first), {entry id, 'deleted'} when it was gone from
the stream (see lost_entry: its task was queued again).

An entry of ours that this consumer does not know of (a read whose reply was
lost) is marked idle (IDLE_MARK), so that the takeover in `maintain`, or
another consumer, runs it at once; one marked already keeps its mark (a
second mark would put its delivery before 1970, which the server clamps to
now, and the entry would wait a whole lease again).
]]
local function renew(Q, cfg, env, ready, held, lost)
  local consumer = env.consumer
  local mine, ids = {}, {}
  for _, p in ipairs(redis.call('XPENDING', ready, GROUP, '-', '+', 1000000,
      consumer)) do
    local entry_id = p[1]
    mine[entry_id] = true
    if held[entry_id] then
      ids[#ids + 1] = entry_id
    elseif p[3] < IDLE_MARK then
      -- JUSTID: neither a renewal nor this mark counts as a delivery.
      local marked = claim(ready, consumer, {entry_id},
        {'IDLE', string.format('%d', IDLE_MARK + p[3]), 'JUSTID'})
      if not marked[entry_id] then
        lost_entry(Q, cfg, env, ready, entry_id, consumer, nil)
      end
    end
  end
  for entry_id in pairs(held) do
    if not mine[entry_id] then
      lost[#lost + 1] = {entry_id, 'taken over'}
    end
  end
  local renewed = claim(ready, consumer, ids, {'JUSTID'})
  for _, entry_id in ipairs(ids) do
    if not renewed[entry_id] then
      lost_entry(Q, cfg, env, ready, entry_id, consumer, held[entry_id])
      lost[#lost + 1] = {entry_id, 'deleted'}
    end
  end
end

--[[
Take over and cancel the lapsed entries of tasks asked to cancel, when
maintain takes nothing else over (the breaker is open, or the caller has no
free slot): cancelling runs nothing, so it need not wait for either. It scans
at most LAPSED_SCAN lapsed entries per ready stream (more would take dead
consumers holding that many while the breaker is open); a task asked to cancel
past them is cancelled when its entry is taken over.
]]
local LAPSED_SCAN = 1000

local function cancel_lapsed(Q, cfg, env, task_prefix, lease, rows)
  for level = 1, 3 do
    local ready = Q.ready[level]
    for _, p in ipairs(redis.call('XPENDING', ready, GROUP, 'IDLE', lease, '-', '+',
        LAPSED_SCAN)) do
      local entry = redis.call('XRANGE', ready, p[1], p[1])[1]
      local task_id = entry and fields_map(entry[2])['task_id']
      local task = task_prefix .. (task_id or '')
      if task_id and redis.call('HGET', task, 'cancel_requested') == '1' then
        redis.call('XCLAIM', ready, GROUP, env.consumer, lease, p[1], 'JUSTID')
        local idle = p[3]
        if idle >= IDLE_MARK then
          idle = idle - IDLE_MARK
        end
        -- start_entry cancels it (the open gate makes sure nothing starts).
        rows[#rows + 1] = start_entry(Q, cfg, env, ready, task, task_id, p[1],
          {p[2], idle}, {open = true})
      end
    end
  end
end

--[[
maintain: a consumer's periodic call. Refreshes its liveness key, promotes due
tasks, renews the lease on every entry it holds, reports which of them were
asked to cancel, and takes over entries whose lease lapsed (unless the breaker
is open), dead-lettering those delivered too often. A lapsed entry whose task
was asked to cancel is taken over and cancelled even while the breaker is open
(cancel_lapsed).

The lease that decides a takeover is the queue's stored one (lease_seconds in
its config hash), not the caller's: processes created with different configs
of one queue then agree on when an entry has lapsed, and one with a short
lease cannot take over the running tasks of one that renews on a longer
lease. The caller's lease serves only a configuration stored before the lease
was. The lease used is returned, so that each consumer renews at least every
third of it, whatever its own config says.

Known limitation: when create_queue shortens a queue's stored lease while
consumers run on the old one, an entry they hold may be taken over once
before they learn the new lease from their next call (at most a third of
their old lease later). The attempt is then fenced, as after any takeover.

KEYS: the queue's keys, then the consumer's worker key
ARGV: consumer, lease ms (used if the stored config has none), liveness ttl
      ms, liveness value, task key prefix, how many entries it may take over,
      expiry seconds, finished channel, then per ready stream (high, medium,
      low): a count n followed by n pairs of held entry id and task id
Returns {lost rows (see renew), rows (see start_entry), task ids asked to
cancel, next due time or '', server time, lease ms, breaker transitions (see
fetch), how many tasks it dead-lettered}.

The takeover finds lapsed entries with XPENDING IDLE, then claims each with
XCLAIM, rather than with XAUTOCLAIM: the task.reclaimed event names the
previous consumer and the idle time, and the dead-letter decision needs the
delivery count; XPENDING returns all three (with the id), while XAUTOCLAIM
returns none of them and, by claiming, overwrites them. The cost: with IDLE,
XPENDING walks the group's whole pending list (every attempt running in the
queue, in every consumer) whenever fewer than `room` entries are idle, about
65 ns an entry. Measured from a client on Redis 7.0.15 and Valkey 8, a PING
taking 9 us: 18 us a call at 100 pending entries, 80 us at 1,000, 0.65 ms at
10,000, 7 to 10 ms at 100,000; an XAUTOCLAIM page of 10 took 80 to 190 us
whatever the length. It runs per level, in each consumer with a free slot,
every third of the lease.
TODO: past about 10,000 attempts running at once in one queue, follow a
cursor with a budget (XPENDING from the last id seen with a COUNT, filtering
the idle time here); below that the whole walk costs less than an XAUTOCLAIM
page and needs no cursor kept between calls.
]]
local function maintain(keys, args)
  local Q = queue(keys)
  local cfg = settings(Q)
  local consumer, task_prefix = args[1], args[5]
  local lease = cfg.lease_ms or tonumber(args[2])
  local room = tonumber(args[6])
  local env = {consumer = consumer, now = now_ms(), expiry = args[7],
    channel = args[8], task_prefix = task_prefix, dead_lettered = 0}
  redis.call('SET', keys[QUEUE_KEYS + 1], args[4], 'PX', args[3])
  local next_due = promote(Q, task_prefix, consumer, env.now, 100)

  local lost, rows, cancel = {}, {}, {}
  local pos = 9
  for level = 1, 3 do
    local ready = Q.ready[level]
    local n = tonumber(args[pos])
    local held = {}
    for j = 1, n do
      local entry_id, task_id = args[pos + 2 * j - 1], args[pos + 2 * j]
      held[entry_id] = task_id
      if redis.call('HGET', task_prefix .. task_id, 'cancel_requested') == '1' then
        cancel[#cancel + 1] = task_id
      end
    end
    pos = pos + 2 * n + 1
    renew(Q, cfg, env, ready, held, lost)
  end

  local gate = breaker_gate(Q, cfg, consumer, env.now)
  if room == 0 or gate.open then
    cancel_lapsed(Q, cfg, env, task_prefix, lease, rows)
  end
  if room > 0 then
    if not gate.open then
      for level = 1, 3 do
        local ready = Q.ready[level]
        local idle = {}
        if room > 0 then
          idle = redis.call('XPENDING', ready, GROUP, 'IDLE', lease, '-', '+', room)
        end
        for _, p in ipairs(idle) do
          local entry_id, owner, idle_ms = p[1], p[2], p[3]
          if idle_ms >= IDLE_MARK then
            idle_ms = idle_ms - IDLE_MARK
          end
          local claimed = redis.call('XCLAIM', ready, GROUP, consumer, lease,
            entry_id)
          room = room - 1
          if #claimed == 0 or not claimed[1][2] then
            lost_entry(Q, cfg, env, ready, entry_id, owner, nil)
          else
            local task_id = fields_map(claimed[1][2])['task_id'] or ''
            local deliveries = tonumber(p[4]) + 1
            if deliveries > cfg.max_deliveries then
              dead_letter(Q, cfg, env, ready, task_prefix .. task_id, task_id,
                entry_id, deliveries, owner)
            else
              rows[#rows + 1] = start_entry(Q, cfg, env, ready,
                task_prefix .. task_id, task_id, entry_id,
                {owner, idle_ms, deliveries}, gate)
            end
          end
        end
      end
    end
  end
  return {lost, rows, cancel, next_due, env.now, lease, Q.transitions,
    env.dead_lettered}
end

--[[
release: hand back every entry this consumer holds, so that others take them
at once instead of after the lease: each task goes back to the end of its
ready stream under a new entry. An attempt that was running is recorded as
`task.interrupted` (the next consumer starts the next attempt); an entry that
was received but never started as `task.released`; an entry gone from its
stream as `task.lost` (see lost_entry), its task queued again all the same.
KEYS: the queue's keys
ARGV: consumer, task key prefix, reason, expiry seconds, finished channel
A running attempt whose task was asked to cancel ends as cancelled instead.
Returns how many tasks were handed back.
]]
local function release(keys, args)
  local Q = queue(keys)
  local cfg = settings(Q)
  local consumer, task_prefix, reason = args[1], args[2], args[3]
  local now = now_ms()
  local env = {consumer = consumer, now = now, expiry = args[4],
    channel = args[5], task_prefix = task_prefix}
  local count = 0
  for level = 1, 3 do
    local ready = Q.ready[level]
    for _, p in ipairs(redis.call('XPENDING', ready, GROUP, '-', '+', 1000000,
        consumer)) do
      local entry_id = p[1]
      local entry = redis.call('XRANGE', ready, entry_id, entry_id)[1]
      if not entry then
        lost_entry(Q, cfg, env, ready, entry_id, consumer, nil)
      end
      local task_id = entry and fields_map(entry[2])['task_id']
      local task = task_prefix .. (task_id or '')
      local t = task_id and task_fields(task)
      local running = t and t.state == 'processing' and t.owner == consumer
      if running and t.cancel_requested then
        drop_entry(Q, ready, entry_id)
        cancelled_unrun(Q, cfg, task, task_id, t, consumer, now, args[4], args[5],
          'its consumer shut down before the attempt stopped')
      elseif t and (t.state == 'queued' or running) then
        if running then
          hand_back(Q, ready, task, task_id, entry_id, t, consumer, reason,
            'task.interrupted')
          move(Q.stats, 'processing', 'queued')
          if t.trial then
            redis.call('HDEL', task, 'trial')
            breaker_outcome(Q, cfg, consumer, now, 'released', false, true)
          end
        else
          hand_back(Q, ready, task, task_id, entry_id, t, consumer, reason,
            'task.released')
        end
        count = count + 1
      elseif entry then
        drop_entry(Q, ready, entry_id)
      end
    end
  end
  return count
end

--[[
refuse: hand back an attempt whose task function this consumer does not have
(a worker started without the --import that defines it, or one of an older
release during a deploy). That is no fault of the task: no retry is used up,
and the breaker does not count it, so one misconfigured consumer can neither
burn tasks nor open the breaker for every consumer. The task waits one lease
(state retry, task.refused) and is then queued again, for a consumer that has
the function; the max_deliveries-th refusal sends it to the dead-letter
stream instead, to be requeued once such a consumer runs. A task asked to
cancel ends cancelled.
Fenced like finish: only the consumer that owns the attempt may refuse it.
KEYS: the queue's keys, then the task hash
ARGV: consumer, task id, entry id, level, attempt, expiry seconds, finished
      channel, lease ms (used if the stored config has none)
Returns {'ok', new state, due time or ''} or {'fenced', why}.
]]
local function refuse(keys, args)
  local Q = queue(keys)
  local cfg = settings(Q)
  local task = keys[QUEUE_KEYS + 1]
  local consumer, task_id, entry_id = args[1], args[2], args[3]
  local ready, attempt = Q.ready[tonumber(args[4])], args[5]
  local t = task_fields(task)
  if t.state ~= 'processing' or t.attempt ~= attempt or t.owner ~= consumer
      or t.entry ~= entry_id then
    return {'fenced', 'task is ' .. tostring(t.state) .. ', attempt ' ..
      tostring(t.attempt) .. ' of ' .. tostring(t.owner)}
  end
  local p = redis.call('XPENDING', ready, GROUP, entry_id, entry_id, 1)[1]
  if not p or p[2] ~= consumer then
    return {'fenced', 'entry is pending at ' .. tostring(p and p[2])}
  end

  local env = {consumer = consumer, now = now_ms(), expiry = args[6],
    channel = args[7]}
  local refusals = (tonumber(redis.call('HGET', task, 'refusals')) or 0) + 1
  if t.cancel_requested then
    drop_entry(Q, ready, entry_id)
    cancelled_unrun(Q, cfg, task, task_id, t, consumer, env.now, env.expiry,
      env.channel, 'cancelled before it ran')
    return {'ok', 'cancelled', ''}
  end
  if refusals >= cfg.max_deliveries then
    dead_letter(Q, cfg, env, ready, task, task_id, entry_id, refusals, consumer,
      t.name)
    return {'ok', 'failed', ''}
  end
  drop_entry(Q, ready, entry_id)
  local due = env.now + (cfg.lease_ms or tonumber(args[8]))
  local eid = append(Q.log, 'task.refused', task_id, t.last_event, attempt,
    consumer, t.tp, '{"entry":' .. json_string(entry_id) .. ',"function":' ..
    json_string(t.name) .. ',"refusals":' .. refusals .. ',"due_at":' .. due ..
    '}')
  redis.call('HSET', task, 'state', 'retry', 'version', t.version + 1,
    'last_event', eid, 'due_at', due, 'refusals', refusals)
  redis.call('HDEL', task, 'trial')
  redis.call('ZADD', Q.sched, due, task_id)
  move(Q.stats, 'processing', 'retry')
  if t.trial then
    breaker_outcome(Q, cfg, consumer, env.now, 'released', false, true)
  end
  return {'ok', 'retry', tostring(due)}
end
