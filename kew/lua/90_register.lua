redis.register_function('__LIB___submit', per_call(submit))
redis.register_function('__LIB___fetch', per_call(fetch))
redis.register_function('__LIB___finish', per_call(finish))
redis.register_function('__LIB___maintain', per_call(maintain))
redis.register_function('__LIB___release', per_call(release))
redis.register_function('__LIB___refuse', per_call(refuse))
redis.register_function('__LIB___cancel', per_call(cancel))
redis.register_function('__LIB___create_queue', per_call(create_queue))
redis.register_function('__LIB___prune', per_call(prune))
redis.register_function('__LIB___requeue', per_call(requeue))
redis.register_function('__LIB___restore', per_call(restore))
redis.register_function('__LIB___trim', per_call(trim))
redis.register_function{
  function_name = '__LIB___history', callback = history, flags = {'no-writes'},
}
redis.register_function{
  function_name = '__LIB___hashes', callback = hashes, flags = {'no-writes'},
}
