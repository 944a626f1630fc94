#!/usr/bin/env node
'use strict';
require('../dist/cli/main.js').main(process.argv).catch((err) => {
  process.stderr.write(`peersan: ${err && err.message ? err.message : String(err)}\n`);
  process.exit(1);
});
