import t from 'tap';
import fc from 'fast-check';
import { insertSorted, removeSorted, VolumeGate } from '../src/snapshot/gate';
import { HybridClock } from '../src/snapshot/hlc';
import { ManualEnv } from '../src/env/manual';
import { realEnv } from '../src/env/real';
import { StampLog } from '../src/snapshot/stamp-log';
import { MemoryBackend } from './helpers/memory-backend';
import type { BlockBackend, WriteOptions } from '../src/store/types';

t.test('the hybrid clock: strictly increasing, pushed forward by what it observes', async (t) => {
  // The wall clock at 1 ms, then set back and forth (skew) while monotonic time stands still.
  const env = new ManualEnv({ wallOriginMs: 0 });
  const setPhysicalUs = (us: number): void => void (env.clock.skewMs = us / 1000);
  setPhysicalUs(1_000);
  const clock = new HybridClock(env.clock);
  const a = clock.now();
  const b = clock.now();
  t.equal(a, 1_000);
  t.ok(b > a, 'same microsecond: still later');
  clock.observe(5_000);
  t.ok(clock.now() > 5_000, 'after observing a stamp, the next one is larger');
  setPhysicalUs(4_000);
  t.ok(clock.now() > 5_000, 'a physical clock behind what was seen does not move it back');
  clock.observe(10);
  setPhysicalUs(9_000);
  t.equal(clock.now(), 9_000, 'the physical clock takes over once it is ahead');
});

t.test('the gate stamps host writes and knows which stamps are in flight', async (t) => {
  const clock = new HybridClock(realEnv().clock);
  const seen: WriteOptions[] = [];
  const finish: (() => void)[] = [];
  const inner = {
    blockBytes: 512, blockCount: 1024, grainBlocks: 128,
    write: (_lba: number, _data: Buffer, opts?: WriteOptions) => new Promise<void>((r) => { seen.push(opts ?? {}); finish.push(r); }),
    unmap: () => Promise.resolve(), compareAndWrite: () => Promise.resolve({ ok: true }), flush: () => Promise.resolve(), read: () => Promise.resolve(Buffer.alloc(512)), lbaStatus: () => Promise.resolve([]),
  } as unknown as BlockBackend;
  const gate = new VolumeGate(inner, realEnv(), clock);
  const w1 = gate.write(0, Buffer.alloc(512), { fua: true });
  const w2 = gate.write(1, Buffer.alloc(512));
  t.equal(seen.length, 2);
  t.ok(seen[0].stamp! > 0 && seen[1].stamp! > seen[0].stamp!, 'each write gets a later stamp');
  t.equal(seen[0].fua, true, 'the host options pass through');
  const cut = clock.now();
  let sealed = false;
  const seal = gate.writesBefore(cut).then(() => (sealed = true));
  gate.write(2, Buffer.alloc(512)); // stamped after the cut: not waited for
  await new Promise((r) => setImmediate(r));
  t.notOk(sealed, 'writes stamped before the cut are still in flight');
  finish[0]();
  await w1;
  await new Promise((r) => setImmediate(r));
  t.notOk(sealed, 'one of them is');
  finish[1]();
  await w2;
  await seal;
  t.ok(sealed, 'none stamped before the cut left: sealed, with a later write still in flight');
  finish[2]();
});

t.test('the in-flight stamps stay sorted whatever order writes are stamped and answered in (fast-check)', async (t) => {
  const op = fc.oneof(fc.record({ add: fc.integer({ min: 0, max: 50 }) }), fc.record({ remove: fc.integer({ min: 0, max: 50 }) }));
  fc.assert(
    fc.property(fc.array(op, { maxLength: 200 }), (ops) => {
      const xs: number[] = [];
      const reference: number[] = [];
      for (const o of ops) {
        if ('add' in o) {
          insertSorted(xs, o.add);
          reference.push(o.add);
        } else {
          removeSorted(xs, o.remove);
          const i = reference.indexOf(o.remove);
          if (i >= 0) reference.splice(i, 1);
        }
      }
      return JSON.stringify(xs) === JSON.stringify(reference.sort((a, b) => a - b));
    }),
  );
  t.pass('inserts and removals in any order, duplicates included, match a sorted multiset');
});

t.test('the stamp log records changes only while asked, returns those before the cut in the order they reached the store, and refuses when it overflowed', async (t) => {
  const clock = new HybridClock(realEnv().clock);
  const store = new MemoryBackend(512, 1024);
  const log = new StampLog(store, clock, 4 * 512);
  await log.write(0, Buffer.alloc(512, 1), { stamp: 10 });
  log.begin('s1');
  t.throws(() => log.begin('s2'), /already recording/, 'one recording at a time');
  await log.write(8, Buffer.alloc(512, 3), { stamp: 30 });
  const data = Buffer.alloc(512, 2);
  await log.write(4, data, { stamp: 20 });
  data.fill(9); // the caller's buffer changes afterwards: the log kept a copy
  await log.unmap(0, 1, { stamp: 25 });
  t.notOk((await log.compareAndWrite(12, Buffer.alloc(512, 7), Buffer.alloc(512, 8), { stamp: 27 })).ok, 'a miscompare changes nothing');
  log.frozen('s1');
  await log.write(16, Buffer.alloc(512, 4), { stamp: 15 }); // late: stamped early, arrived after the freeze
  const changes = log.end('s1', 28);
  t.same(changes.map((c) => [c.stamp, c.lba, c.data ? c.data[0] : null, c.afterFreeze]), [[20, 4, 2, false], [25, 0, null, false], [15, 16, 4, true]], 'before the cut, in the store\'s order (the late stamp-15 write last); the miscompare and the stamp-30 write are not there');
  t.same(await store.read(4, 1), Buffer.alloc(512, 2), 'the store got every change as usual');
  t.throws(() => log.end('s1', 28), /no recording/, 'ended');

  log.begin('s3');
  for (let i = 0; i < 5; i++) await log.write(i, Buffer.alloc(512, i), { stamp: 100 + i });
  t.throws(() => log.end('s3', 1_000), /more than 2048 bytes/, 'past its bound the recording is refused: the snapshot aborts');
  log.begin('s4');
  log.drop('s4');
  t.notOk(log.isRecording, 'dropped');
});
