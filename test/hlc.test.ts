import t from 'tap';
import { VolumeGate } from '../src/snapshot/gate';
import { HybridClock } from '../src/snapshot/hlc';
import type { BlockBackend, WriteOptions } from '../src/store/types';

t.test('the hybrid clock: strictly increasing, pushed forward by what it observes', async (t) => {
  let physical = 1_000;
  const clock = new HybridClock(() => physical);
  const a = clock.now();
  const b = clock.now();
  t.equal(a, 1_000);
  t.ok(b > a, 'same microsecond: still later');
  clock.observe(5_000);
  t.ok(clock.now() > 5_000, 'after observing a stamp, the next one is larger');
  physical = 4_000;
  t.ok(clock.now() > 5_000, 'a physical clock behind what was seen does not move it back');
  clock.observe(10);
  physical = 9_000;
  t.equal(clock.now(), 9_000, 'the physical clock takes over once it is ahead');
});

t.test('the gate stamps host writes and knows which stamps are in flight', async (t) => {
  const clock = new HybridClock();
  const seen: WriteOptions[] = [];
  const finish: (() => void)[] = [];
  const inner = {
    blockBytes: 512, blockCount: 1024, grainBlocks: 128,
    write: (_lba: number, _data: Buffer, opts?: WriteOptions) => new Promise<void>((r) => { seen.push(opts ?? {}); finish.push(r); }),
    unmap: () => Promise.resolve(), compareAndWrite: () => Promise.resolve({ ok: true }), flush: () => Promise.resolve(), read: () => Promise.resolve(Buffer.alloc(512)), lbaStatus: () => Promise.resolve([]),
  } as unknown as BlockBackend;
  const gate = new VolumeGate(inner, clock);
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
