#!/usr/bin/env node
'use strict';
// Storage I/O runs on libuv's thread pool, sized before anything loads. About one thread per
// core: a read or write the page cache answers is a copy, CPU-bound, and every idle thread in the
// pool costs a futex wake-up and a context switch per request handed to it (bench/vs-tgt.js with
// 16 threads on a 2-core box: 3.3 context switches and 33 µs CPU per 4 KiB write; with 2: 1.1 and
// 22 µs, same IOPS). At least 4, so that an fdatasync or two (FUA, SYNCHRONIZE CACHE) and a
// LevelDB job do not hold up every read (4 against 2 measured within the noise: 4 KiB reads 24.7
// vs 32.3 µs/op, writes 32.0 vs 24.2). Disks slower than the page cache want more requests in
// flight: set UV_THREADPOOL_SIZE (up to 1024) for those.
process.env.UV_THREADPOOL_SIZE = process.env.UV_THREADPOOL_SIZE || String(Math.max(4, require('node:os').availableParallelism()));
require('../dist/cli/main.js').main(process.argv);
