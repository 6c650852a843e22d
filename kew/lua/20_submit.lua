--[[
submit: add tasks to the queue, all or nothing.
KEYS: the queue's keys, then per task: task hash
ARGV: actor, then per task (12 values):
      task_id, name, task_type, priority (1-3), args, data, tp,
      max_retries, retry_delay_ms, timeout_ms (0: none),
      defer_until_ms (0: none), defer_by_ms (0: none)
`data` is the task.submitted event's data without the due time, which this
function adds (from the server's clock) for a deferred task.
Returns {'ok', event id, entry id or '', due time or '', ...} per task in
order (a deferred task has a due time, in server ms, and no entry yet), or
{'noqueue'}, {'exists', ids...}, {'duplicate', ids...} or
{'full', unfinished, max_size, tasks in the call, ids that do not fit...}.
]]
local SUBMIT_ARGS = 12

local function submit(keys, args)
  local Q = queue(keys)
  local actor = args[1]
  local n = #keys - QUEUE_KEYS

  if redis.call('EXISTS', Q.ready[2]) == 0 then
    return {'noqueue'}
  end
  local existing, seen, repeated = {'exists'}, {}, {'duplicate'}
  for i = 1, n do
    local task_id = args[2 + (i - 1) * SUBMIT_ARGS]
    if seen[task_id] then
      repeated[#repeated + 1] = task_id
    end
    seen[task_id] = true
    if redis.call('EXISTS', keys[QUEUE_KEYS + i]) == 1 then
      existing[#existing + 1] = task_id
    end
  end
  if #repeated > 1 then
    return repeated  -- an id given twice in one batch
  end
  if #existing > 1 then
    return existing
  end
  local cfg = settings(Q)
  local count = unfinished(Q.stats)
  if cfg.max_size > 0 and count + n > cfg.max_size then
    -- The tasks of the batch past the room left, so the error can name them.
    local reply = {'full', count, cfg.max_size, n}
    for i = math.max(cfg.max_size - count, 0) + 1, n do
      reply[#reply + 1] = args[2 + (i - 1) * SUBMIT_ARGS]
    end
    return reply
  end

  local now = now_ms()
  local reply = {'ok'}
  for i = 1, n do
    local task = keys[QUEUE_KEYS + i]
    local a = {}
    for j = 1, SUBMIT_ARGS do
      a[j] = args[1 + (i - 1) * SUBMIT_ARGS + j]
    end
    local task_id, priority, data, tp = a[1], a[4], a[6], a[7]
    local due = tonumber(a[11])
    if due == 0 and tonumber(a[12]) > 0 then
      due = now + tonumber(a[12])
    end
    local deferred = due > now
    if deferred then
      data = string.sub(data, 1, -2) .. ',"due_at":' .. due .. '}'
    end

    local eid = append(Q.log, 'task.submitted', task_id, nil, '0', actor, tp, data)
    local fields = {'HSET', task, 'state', deferred and 'scheduled' or 'queued',
      'version', '1', 'last_event', eid, 'name', a[2], 'task_type', a[3],
      'priority', priority, 'args', a[5], 'attempt', '0',
      'submitted_at', ms_of(eid), 'max_retries', a[8],
      'retry_delay_ms', a[9]}
    if tonumber(a[10]) > 0 then
      fields[#fields + 1] = 'timeout_ms'
      fields[#fields + 1] = a[10]
    end
    if tp ~= '' then
      fields[#fields + 1] = 'tp'
      fields[#fields + 1] = tp
    end
    local rid = ''
    if deferred then
      fields[#fields + 1] = 'due_at'
      fields[#fields + 1] = due
      redis.call('ZADD', Q.sched, due, task_id)
      move(Q.stats, nil, 'scheduled')
    else
      rid = enqueue(Q.ready[tonumber(priority)], task_id, tp)
      move(Q.stats, nil, 'queued')
    end
    redis.call(unpack(fields))
    -- An id reused after its record expired: the index of ended tasks must
    -- not say that this new task has ended.
    redis.call('HDEL', Q.ended, task_id)
    reply[#reply + 1] = eid
    reply[#reply + 1] = rid
    reply[#reply + 1] = deferred and tostring(due) or ''
  end
  return reply
end
