// The store's data file (src/store/data-file.ts): writes asked for in one turn go out at its end,
// a run of adjacent ones as one pwritev; nothing is reordered, every write's bytes land where
// it asked, and a failure reaches every write of its run. adjacentRuns, pure, against a model.

import t from 'tap';
import fc from 'fast-check';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NoSpaceError } from '../src/errors';
import { adjacentRuns, DataFile, type QueuedWrite } from '../src/store/data-file';

const queued = (position: number, bytes: number): QueuedWrite => ({ buf: Buffer.alloc(bytes), position, resolve: () => undefined, reject: () => undefined });

t.test('adjacentRuns: runs in order, each write where the one before it ended, bounded', async (t) => {
  const q = [queued(0, 4096), queued(4096, 4096), queued(8192, 512), queued(100, 4), queued(104, 4), queued(104, 4), queued(0, 4096)];
  t.same(adjacentRuns(q).map((r) => r.map((w) => w.position)), [[0, 4096, 8192], [100, 104], [104], [0]], 'a gap, an overlap and a step back each start a new run');
  t.equal(adjacentRuns(Array.from({ length: 200 }, (_, i) => queued(i * 512, 512))).length, 4, '200 adjacent writes: runs of at most 64');
  t.same(adjacentRuns([queued(0, 1024 * 1024), queued(1024 * 1024, 1)]).map((r) => r.length), [1, 1], 'at most 1 MiB per run');
  fc.assert(
    fc.property(fc.array(fc.record({ position: fc.nat(64), bytes: fc.integer({ min: 1, max: 16 }) }), { maxLength: 40 }), (spec) => {
      const q = spec.map((s) => queued(s.position, s.bytes));
      const runs = adjacentRuns(q);
      if (runs.flat().some((w, i) => w !== q[i])) return false;
      return runs.every((r) => r.every((w, i) => i === 0 || w.position === r[i - 1].position + r[i - 1].buf.length));
    }),
  );
});

t.test('the file: writes of one turn, adjacent or not, land as asked; a later write of the same bytes wins', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-datafile-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = await DataFile.open(join(dir, 'data'));
  t.teardown(() => file.close());
  const expected = Buffer.alloc(64 * 1024);
  const writes: Promise<void>[] = [];
  const write = (position: number, bytes: number, fill: number, offset = 0): void => {
    const b = Buffer.alloc(offset + bytes, fill);
    writes.push(file.write(b, offset, bytes, position));
    expected.fill(fill, position, position + bytes);
  };
  for (let i = 0; i < 8; i++) write(i * 4096, 4096, i + 1); // one run of 8
  write(40_000, 1000, 20, 10); // alone, from an offset in its buffer
  write(50_000, 3000, 21);
  await Promise.all(writes);
  writes.length = 0;
  write(1000, 100, 30); // next turn: over earlier bytes
  write(1100, 100, 31);
  await Promise.all(writes);
  t.ok(readFileSync(join(dir, 'data')).equals(expected.subarray(0, 53_000)), 'the file holds every write, the later ones over the earlier');
  const back = Buffer.alloc(4096);
  await file.read(back, 0, 4096, 4096);
  t.ok(back.equals(Buffer.alloc(4096, 2)), 'read back through the file');
});

t.test('a failing run fails every write in it', { skip: existsSync('/dev/full') ? false : 'no /dev/full' }, async (t) => {
  const full = await DataFile.open('/dev/full');
  t.teardown(() => full.close());
  const results = await Promise.all([0, 4096, 8192].map((p) => full.write(Buffer.alloc(4096), 0, 4096, p).then(() => 'written', (e: unknown) => e)));
  t.ok(results.every((r) => r instanceof NoSpaceError), `all three: NoSpaceError (${results.map(String).join('; ')})`);
});
