#!/usr/bin/env node
'use strict';
// Storage I/O runs on libuv's thread pool: give it room for queue depth 32+ before anything loads.
process.env.UV_THREADPOOL_SIZE = process.env.UV_THREADPOOL_SIZE || '16';
require('../dist/cli/main.js').main(process.argv);
