// Lets a bench require the test suite's TypeScript helpers (test/helpers/*.ts, and the src/
// files they import) with the project's TypeScript compiler, transpile only: one client for the
// tests and the benches. Needs dist/ too (the peers the benches start run bin/peersan.js).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const ts = require('typescript');

const root = path.join(__dirname, '..', '..');
if (!fs.existsSync(path.join(root, 'dist', 'cli', 'main.js'))) {
  console.error('bench: dist/ is missing; run `npm run build` first');
  process.exit(1);
}

require.extensions['.ts'] = (module, filename) => {
  const source = fs.readFileSync(filename, 'utf8');
  const out = ts.transpileModule(source, { fileName: filename, compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true } });
  module._compile(out.outputText, filename);
};
