redis.register_function('__LIB___submit', submit)
redis.register_function('__LIB___fetch', fetch)
redis.register_function('__LIB___finish', finish)
redis.register_function('__LIB___maintain', maintain)
redis.register_function('__LIB___release', release)
redis.register_function('__LIB___refuse', refuse)
redis.register_function('__LIB___cancel', cancel)
redis.register_function('__LIB___create_queue', create_queue)
redis.register_function('__LIB___prune', prune)
redis.register_function('__LIB___requeue', requeue)
redis.register_function('__LIB___restore', restore)
redis.register_function('__LIB___trim', trim)
redis.register_function{
  function_name = '__LIB___history', callback = history, flags = {'no-writes'},
}
redis.register_function{
  function_name = '__LIB___hashes', callback = hashes, flags = {'no-writes'},
}
