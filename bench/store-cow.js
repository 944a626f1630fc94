#!/usr/bin/env node
// Page store micro-benchmark (in-process, no network, no iSCSI): 4 KiB random writes.
//
//   npm run build && node bench/store-cow.js [--region-mib 1024] [--writes 20000] [--depth 32] [--repeat 3]
//
// Phases, each on a volume of 4096-byte blocks whose first --region-mib are filled first
// (so every phase overwrites mapped grains):
//   first-write    4 KiB random writes to a fresh (unfilled) volume: most allocate a grain
//   overwrite      4 KiB random overwrites, no snapshot: the common path
//   after-snap     snapshot, then the same number of 4 KiB random writes right away: the
//                  first write to each 64 KiB grain copies it (copy-on-write)
//   after-snap-2   the same again without a new snapshot: grains written since the snapshot
//                  are in the current epoch and written in place
// Figures are the median over --repeat of IOPS at depth --depth. Not a test: nothing asserted.
'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { PageStore } = require('../dist/store/page-store');

const args = { regionMib: 1024, writes: 20000, depth: 32, repeat: 3 };
for (let i = 2; i < process.argv.length; i += 2) {
  const k = process.argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
  if (!(k in args)) throw new Error(`unknown argument ${process.argv[i]}`);
  args[k] = Number(process.argv[i + 1]);
}

const blockBytes = 4096;
const regionBlocks = (args.regionMib * 1024 * 1024) / blockBytes;

function rng(seed) {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 0x100000000;
  };
}

async function randomWrites(v, count, seed) {
  const next = rng(seed);
  const buf = Buffer.alloc(blockBytes, 0x5a);
  let issued = 0;
  const started = process.hrtime.bigint();
  const worker = async () => {
    while (issued < count) {
      issued++;
      await v.write(Math.floor(next() * regionBlocks), buf);
    }
  };
  await Promise.all(Array.from({ length: args.depth }, worker));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  return count / seconds;
}

async function fill(v) {
  const chunk = Buffer.alloc(1024 * 1024, 0x11);
  for (let lba = 0; lba < regionBlocks; lba += chunk.length / blockBytes) await v.write(lba, chunk);
  await v.flush();
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

(async () => {
  const results = { firstWrite: [], overwrite: [], afterSnap: [], afterSnap2: [] };
  for (let r = 0; r < args.repeat; r++) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'peersan-store-bench-'));
    try {
      const store = await PageStore.open(dir);
      const fresh = await store.openVolume('00000000000000bf', { blockBytes, blockCount: regionBlocks });
      results.firstWrite.push(await randomWrites(fresh, args.writes, 50 + r));
      const v = await store.openVolume('00000000000000be', { blockBytes, blockCount: regionBlocks });
      await fill(v);
      results.overwrite.push(await randomWrites(v, args.writes, 1 + r));
      if (typeof v.snapshot === 'function') {
        await v.flush();
        const t0 = process.hrtime.bigint();
        await v.snapshot(`s${r}`);
        const snapMs = Number(process.hrtime.bigint() - t0) / 1e6;
        results.afterSnap.push(await randomWrites(v, args.writes, 100 + r));
        results.afterSnap2.push(await randomWrites(v, args.writes, 100 + r));
        console.log(`run ${r}: snapshot took ${snapMs.toFixed(2)} ms; layers ${JSON.stringify(v.layerUsage())}`);
      }
      await store.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
  const line = (name, xs) => xs.length && console.log(`${name.padEnd(14)} median ${Math.round(median(xs))} IOPS  (runs: ${xs.map(Math.round).join(', ')})`);
  console.log(`4 KiB random writes, depth ${args.depth}, ${args.writes} writes per phase over ${args.regionMib} MiB`);
  line('first-write', results.firstWrite);
  line('overwrite', results.overwrite);
  line('after-snap', results.afterSnap);
  line('after-snap-2', results.afterSnap2);
  if (results.afterSnap.length) console.log(`ratio after-snap / overwrite: ${(median(results.afterSnap) / median(results.overwrite)).toFixed(2)}`);
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
