--[[
The circuit breaker: one per queue, shared by every process, changed only here.

    closed     tasks start; consecutive final failures are counted
    open       no task starts until `until`; submissions are still accepted
    half_open  at most `circuit_breaker_trials` trial attempts run; a trial
               success closes the breaker, a trial failure opens it again

What counts: a task's *final* failure (no retry left: an error, a timeout, or
a dead letter) adds one to `failures`; a success resets it to 0. A failed
attempt that will be retried does not count while the breaker is closed. An
attempt that ends without a verdict counts for nothing: cancelled (also a
failure after a cancel request, which `finish` records as cancelled),
interrupted at a shutdown, or handed back. In half_open, any failed trial
attempt reopens the breaker, retry or not: the trial's job is to probe, and it
found the fault. Only trials move a half-open breaker: an attempt that started
before it opened may still end, and its success or failure changes `failures`
alone.

A trial is marked on its task (`trial`), and `trials` counts the trial
attempts running now. It goes down by one at every end of a trial attempt,
whatever the verdict and whatever the breaker's state by then (succeeded,
failed, interrupted, cancelled, dead-lettered, or queued again because its
entry was lost), and it is never reset: a trial of an earlier half-open
period that still runs keeps its slot, so at most
`circuit_breaker_trials` trials run at any moment. A trial whose consumer died
is reclaimed and continues as the same trial (see start_entry), or ends as a
dead letter, so a lost consumer never leaves the breaker stuck half-open.

The hash holds state, failures, until, trials, version and last_event, all
written together; version and last_event move with each breaker.* event.

Each transition is also noted in the call's `Q.transitions`, which fetch,
maintain and finish return: the process that made the call counts it in its
metrics, so every transition is counted once, whichever process samples the
queue. breaker.opened and breaker.closed carry the `tp` of the attempt whose
outcome caused them, so the log leads to the trace of the task that tripped
(or closed) the breaker; breaker.half_opened follows from the clock alone and
carries none.
]]

-- The breaker as this call last read or wrote it (see `breakers`). Callers
-- change the returned table in place and then write it, or leave it as it
-- was read.
local function breaker_read(Q)
  local cached = breakers[Q.breaker]
  if cached then
    return cached
  end
  local b = redis.call('HMGET', Q.breaker, 'state', 'failures', 'until',
    'trials', 'version', 'last_event')
  cached = {
    state = b[1] or 'closed', failures = tonumber(b[2]) or 0,
    until_ms = tonumber(b[3]) or 0, trials = tonumber(b[4]) or 0,
    version = tonumber(b[5]) or 0, last_event = b[6] or '',
  }
  breakers[Q.breaker] = cached
  return cached
end

local function breaker_write(Q, b)
  redis.call('HSET', Q.breaker, 'state', b.state, 'failures', b.failures,
    'until', b.until_ms, 'trials', b.trials, 'version', b.version,
    'last_event', b.last_event)
  breakers[Q.breaker] = b
end

-- Record the transition to b.state (already set): its event, and a note
-- in the call's reply.
local function breaker_event(Q, b, etype, actor, data, tp)
  b.last_event = append(Q.log, etype, nil, nil, nil, actor, tp, data)
  b.version = b.version + 1
  Q.transitions[#Q.transitions + 1] = b.state
end

local function breaker_open(Q, b, cfg, actor, now, reason, tp)
  b.state = 'open'
  b.until_ms = now + cfg.reset_ms
  breaker_event(Q, b, 'breaker.opened', actor, '{"reason":' ..
    json_string(reason) .. ',"failures":' .. b.failures .. ',"until":' ..
    b.until_ms .. '}', tp)
end

--[[
How many attempts may start now. Returns a gate:
  {open = true, until_ms = ...}            nothing may start
  {half_open = true, room = n}             at most n new trials
  {}                                       closed: no limit
Moves an open breaker whose time is up to half_open (breaker.half_opened).
]]
local function breaker_gate(Q, cfg, actor, now)
  local b = breaker_read(Q)
  if b.state == 'open' then
    if now < b.until_ms then
      return {open = true, until_ms = b.until_ms}
    end
    b.state = 'half_open'
    breaker_event(Q, b, 'breaker.half_opened', actor, '{}')
    breaker_write(Q, b)
  end
  if b.state == 'half_open' then
    return {half_open = true, room = math.max(cfg.trials - b.trials, 0)}
  end
  return {}
end

local function breaker_take_trial(Q)
  local b = breaker_read(Q)
  b.trials = b.trials + 1
  breaker_write(Q, b)
end

--[[
Record an attempt's outcome in the breaker.
outcome: 'succeeded', 'failed' (final or not) or 'released' (a trial that
ended without a verdict: interrupted, released, cancelled). `trial`: the
attempt was a trial, which frees its slot. `tp`: the attempt's task's, for
the event of a transition it causes (a release causes none).
]]
local function breaker_outcome(Q, cfg, actor, now, outcome, final, trial, tp)
  local b = breaker_read(Q)
  local before = b.failures .. b.state .. b.trials
  if trial and b.trials > 0 then
    b.trials = b.trials - 1
  end
  if outcome == 'succeeded' then
    b.failures = 0
    if trial and b.state == 'half_open' then
      b.state = 'closed'
      b.until_ms = 0
      breaker_event(Q, b, 'breaker.closed', actor,
        '{"reason":"a trial succeeded"}', tp)
    end
  elseif outcome == 'failed' then
    if final then
      b.failures = b.failures + 1
    end
    if trial and b.state == 'half_open' then
      breaker_open(Q, b, cfg, actor, now, 'a trial failed', tp)
    elseif b.state == 'closed' and final and b.failures >= cfg.max_failures then
      breaker_open(Q, b, cfg, actor, now, 'consecutive failures', tp)
    end
  end
  if before ~= b.failures .. b.state .. b.trials then
    breaker_write(Q, b)
  end
end
