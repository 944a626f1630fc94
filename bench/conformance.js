#!/usr/bin/env node
// Scores libiscsi's conformance suite (iscsi-test-cu -d -v) per test: passed cleanly, passed
// only because a [SKIPPED] line says the feature is missing, or failed.
//
//   node bench/conformance.js --url iscsi://127.0.0.1:3260/iqn.2026-11.io.peersan:demo/0 [--url2 URL] [--test PATTERN]
//   node bench/conformance.js --log saved-output.txt        (score an existing -v log)
//
// Prints the three counts and the failed/skipped tests with their first reason line; writes
// JSON next to the log when --json FILE is given.
'use strict';

const { spawnSync } = require('node:child_process');
const { readFileSync, writeFileSync } = require('node:fs');

function parseArgs(argv) {
  const args = { timeoutSec: 1800 };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = argv[i + 1];
    if (k === '--url') (args.url = v), i++;
    else if (k === '--url2') (args.url2 = v), i++;
    else if (k === '--test') (args.test = v), i++;
    else if (k === '--log') (args.log = v), i++;
    else if (k === '--json') (args.json = v), i++;
    else if (k === '--timeout') (args.timeoutSec = Number(v)), i++;
    else throw new Error(`unknown argument ${k}`);
  }
  if (!args.url && !args.log) throw new Error('need --url or --log');
  return args;
}

/** Parse iscsi-test-cu -v output into [{ name, outcome, reason }]. */
function score(text) {
  const tests = [];
  let suite = '';
  let current;
  const finish = () => {
    if (current) tests.push(current);
    current = undefined;
  };
  for (const line of text.split('\n')) {
    const s = /^Suite: (.+)$/.exec(line);
    if (s) {
      finish();
      suite = s[1].trim();
      continue;
    }
    const t = /^ {2}Test: (\S+) \.\.\.(.*)$/.exec(line);
    if (t) {
      finish();
      current = { name: `${suite}.${t[1]}`, outcome: undefined, reason: '', skipped: false };
      // "...passed" right after the name ends the test; what follows on that line belongs to the
      // next suite's setup (iscsi-test-cu prints it without a newline).
      if (t[2].startsWith('passed')) current.outcome = 'passed';
      else consume(current, t[2]);
      continue;
    }
    if (current) consume(current, line);
    if (/^Run Summary/.test(line)) finish();
  }
  finish();
  return tests.map((t) => ({ name: t.name, outcome: t.outcome === 'failed' ? 'failed' : t.skipped ? 'skipped' : t.outcome === 'passed' ? 'clean' : 'unknown', reason: t.reason }));
}

function consume(test, line) {
  if (line.includes('[SKIPPED]')) {
    test.skipped = true;
    if (!test.reason) test.reason = line.trim();
  }
  if (/\[FAILED\]/.test(line) && !test.reason) test.reason = line.trim();
  // "passed" ends a test; text after it on the same line is the next suite's setup talking.
  if (/^\s*passed(\s|$)/.test(line) || /(^|\s)passed\s*$/.test(line)) {
    test.outcome = test.outcome ?? 'passed';
    return;
  }
  if (/(^|\s|\.)FAILED\s*$/.test(line)) test.outcome = 'failed';
  if (/^\s+\d+\. .*CU_/.test(line) && test.outcome === 'failed' && !test.reason) test.reason = line.trim();
}

function main() {
  const args = parseArgs(process.argv);
  let text;
  let seconds;
  if (args.log) {
    text = readFileSync(args.log, 'utf8');
  } else {
    const started = Date.now();
    const cli = ['-d', '-v'];
    if (args.test) cli.push('-t', args.test);
    cli.push(args.url, args.url2 ?? args.url);
    const r = spawnSync('iscsi-test-cu', cli, { encoding: 'utf8', timeout: args.timeoutSec * 1000, maxBuffer: 256 * 1024 * 1024 });
    if (r.error) throw r.error;
    text = `${r.stdout}\n${r.stderr}`;
    seconds = (Date.now() - started) / 1000;
  }
  const tests = score(text);
  const count = (o) => tests.filter((t) => t.outcome === o).length;
  // CUnit's own verdict, to cross-check the per-test parse.
  const cunit = /^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/m.exec(text);
  const summary = { total: tests.length, clean: count('clean'), skipped: count('skipped'), failed: count('failed'), unknown: count('unknown'), seconds, cunit: cunit ? { ran: Number(cunit[2]), passed: Number(cunit[3]), failed: Number(cunit[4]) } : undefined };
  console.log(`iscsi-test-cu: ${summary.total} tests: ${summary.clean} clean, ${summary.skipped} skipped, ${summary.failed} failed${summary.unknown ? `, ${summary.unknown} unfinished` : ''}${seconds ? ` (${seconds.toFixed(0)} s)` : ''}${summary.cunit ? `; CUnit: ${summary.cunit.ran} ran, ${summary.cunit.passed} passed, ${summary.cunit.failed} failed` : ''}`);
  for (const o of ['failed', 'unknown', 'skipped']) {
    for (const t of tests.filter((x) => x.outcome === o)) console.log(`  ${o.padEnd(7)} ${t.name}  ${t.reason}`);
  }
  if (args.json) writeFileSync(args.json, JSON.stringify({ summary, tests }, null, 2));
  process.exitCode = 0;
}

if (require.main === module) main();
module.exports = { score };
