--[[
Reading: functions with the no-writes flag, called with FCALL_RO (they may run
on a replica).
]]

--[[
history: one task's events, newest first, by following the per-task chain of
`prev` ids from its last event, so it costs one lookup per event, not a scan
of the log. The last event comes from the task's record, or, once the record
has expired, from the index of ended tasks.
KEYS: log, task hash, ended index
ARGV: task id, how many events at most
Returns a list of {entry id, fields}, or {} if the task is unknown.
]]
local function history(keys, args)
  local log, task, ended_index = keys[1], keys[2], keys[3]
  local id = redis.call('HGET', task, 'last_event') or
    redis.call('HGET', ended_index, args[1])
  local events, limit = {}, tonumber(args[2])
  while id and #events < limit do
    local entry = redis.call('XRANGE', log, id, id)[1]
    if not entry then
      break  -- trimmed by the retention policy: the rest is in the archive
    end
    events[#events + 1] = entry
    id = fields_map(entry[2])['prev']
  end
  return events
end

--[[
hashes: many task hashes in one call (verify reads every task of a queue).
KEYS: task hashes
Returns each hash's fields, flat (name, value, ...), in the order of KEYS;
{} for a key that does not exist.
]]
local function hashes(keys, args)
  local found = {}
  for i = 1, #keys do
    found[i] = redis.call('HGETALL', keys[i])
  end
  return found
end
