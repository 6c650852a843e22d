-- (Only the `redis` API exists while a library loads: no pairs or ipairs.)
-- The functions that write, each wrapped by per_call (see 00_common.lua).
local writers = {
  {'submit', submit}, {'fetch', fetch}, {'finish', finish},
  {'maintain', maintain}, {'release', release}, {'refuse', refuse},
  {'cancel', cancel}, {'create_queue', create_queue}, {'prune', prune},
  {'requeue', requeue}, {'restore', restore}, {'trim', trim},
}
for i = 1, #writers do
  redis.register_function('__LIB___' .. writers[i][1], per_call(writers[i][2]))
end
-- The functions that only read (FCALL_RO).
local readers = {{'history', history}, {'hashes', hashes}}
for i = 1, #readers do
  redis.register_function{
    function_name = '__LIB___' .. readers[i][1], callback = readers[i][2],
    flags = {'no-writes'},
  }
end
