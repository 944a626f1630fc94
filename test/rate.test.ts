// The migration copier's pacing (src/migration/rate.ts): the byte bucket and the pacer that
// gives way to host I/O.

import t from 'tap';
import { ManualEnv } from '../src/env/manual';
import { ByteRate, ChunkPacer } from '../src/migration/rate';

t.test('the pacer does not pause chunks that cost what quiet chunks cost, or up to twice that', async (t) => {
  const p = new ChunkPacer(0.15);
  for (const ms of [1, 1.2, 0.9, 1.5, 1.8, 1]) t.equal(p.pauseAfter(ms), 0, `${ms} ms`);
});

t.test('a chunk that waited behind other work is followed by a pause that makes the waiting 15 % of the time', async (t) => {
  const p = new ChunkPacer(0.15);
  for (let i = 0; i < 10; i++) p.pauseAfter(1);
  // 5 ms against a quiet 1 ms: 3 ms beyond the 2 ms target; 3 ms is 15 % of 3 + 17 ms.
  t.equal(Math.round(p.pauseAfter(5)), 17);
  t.equal(p.pauseAfter(1000), 200, 'bounded');
});

t.test('the quiet cost is the fastest of the recent chunks: once old quick chunks are forgotten, a slower path is the new normal', async (t) => {
  const p = new ChunkPacer(0.5, 4);
  p.pauseAfter(1);
  t.ok(p.pauseAfter(10) > 0, 'slow against the remembered 1 ms');
  for (let i = 0; i < 4; i++) p.pauseAfter(10);
  t.equal(p.pauseAfter(10), 0, 'after 4 chunks of 10 ms, 10 ms is quiet');
});

t.test('duty 1 never pauses', async (t) => {
  const p = new ChunkPacer(1);
  p.pauseAfter(1);
  t.equal(p.pauseAfter(100), 0);
});

t.test('the byte bucket lets a burst through, then paces at the rate', async (t) => {
  const env = new ManualEnv();
  const r = new ByteRate(1e6, 256 * 1024, env);
  await r.take(256 * 1024);
  t.equal(env.timers.pending(), 0, 'the burst is free');
  let taken = false;
  void r.take(100_000).then(() => (taken = true));
  await env.run(99);
  t.notOk(taken, 'not after 99 ms');
  await env.run(1);
  t.ok(taken, '100 kB at 1 MB/s waits 100 ms');
});
