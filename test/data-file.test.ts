// The store's data file (src/store/data-file.ts): writes asked for in one turn go out at its end,
// a run of adjacent ones as one pwritev; nothing is reordered, every write's bytes land where
// it asked, and a failure reaches every write of its run. No system call writes more than
// callBytesMax: larger writes go as aligned pieces that settle them together. Small runs are
// written inline until one is slow, then go to the write threads for a while. adjacentRuns,
// piecesOf and skipBytes, pure, against a model.

import t from 'tap';
import fc from 'fast-check';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NoSpaceError } from '../src/errors';
import { adjacentRuns, callBytesMax, DataFile, InlineWrites, piecesOf, skipBytes, type QueuedWrite } from '../src/store/data-file';
import { WriteThreads } from '../src/store/write-threads';

const queued = (position: number, bytes: number): QueuedWrite => ({ buf: Buffer.alloc(bytes), position, resolve: () => undefined, reject: () => undefined });

t.test('adjacentRuns: runs in order, each write where the one before it ended, bounded', async (t) => {
  const q = [queued(0, 4096), queued(4096, 4096), queued(8192, 512), queued(100, 4), queued(104, 4), queued(104, 4), queued(0, 4096)];
  t.same(adjacentRuns(q).map((r) => r.map((w) => w.position)), [[0, 4096, 8192], [100, 104], [104], [0]], 'a gap, an overlap and a step back each start a new run');
  t.equal(adjacentRuns(Array.from({ length: 200 }, (_, i) => queued(i * 512, 512))).length, 4, '200 adjacent writes: runs of at most 64');
  t.same(adjacentRuns([queued(0, 200 * 1024), queued(200 * 1024, 56 * 1024), queued(256 * 1024, 1)]).map((r) => r.length), [2, 1], 'at most 256 KiB per run');
  fc.assert(
    fc.property(fc.array(fc.record({ position: fc.nat(64), bytes: fc.integer({ min: 1, max: 16 }) }), { maxLength: 40 }), (spec) => {
      const q = spec.map((s) => queued(s.position, s.bytes));
      const runs = adjacentRuns(q);
      if (runs.flat().some((w, i) => w !== q[i])) return false;
      return runs.every((r) => r.every((w, i) => i === 0 || w.position === r[i - 1].position + r[i - 1].buf.length));
    }),
  );
});

t.test('piecesOf: a write over callBytesMax is cut at aligned offsets and settles once, after every piece', async (t) => {
  const kib = 1024;
  t.equal(callBytesMax, 256 * kib);
  const settled: string[] = [];
  const write = (position: number, bytes: number): QueuedWrite => ({
    buf: Buffer.alloc(bytes), position, resolve: () => settled.push('resolved'), reject: (err) => settled.push(`rejected: ${err.message}`),
  });
  const small = write(100, callBytesMax);
  t.same(piecesOf(small), [small], 'a write of callBytesMax is not cut, aligned or not');
  const w = write(100 * kib, 600 * kib);
  const pieces = piecesOf(w);
  t.same(pieces.map((p) => [p.position / kib, p.buf.length / kib]), [[100, 156], [256, 256], [512, 188]], 'cut where the file crosses 256 KiB boundaries');
  t.ok(pieces.every((p) => p.buf.buffer === w.buf.buffer && p.buf.byteOffset === w.buf.byteOffset + p.position - w.position), 'the pieces are views of the write, in order');
  pieces[2].resolve();
  pieces[0].resolve();
  t.same(settled, [], 'not settled while a piece is in flight');
  pieces[1].resolve();
  t.same(settled, ['resolved'], 'resolved once, after the last piece');
  settled.length = 0;
  const f = piecesOf(write(0, 3 * callBytesMax));
  f[1].reject(new Error('first'));
  f[0].reject(new Error('second'));
  t.same(settled, [], 'a failure waits for the other pieces');
  f[2].resolve();
  t.same(settled, ['rejected: first'], 'then fails the write once, with the first failure');
  fc.assert(
    fc.property(fc.nat(4 * callBytesMax), fc.integer({ min: 1, max: 5 * callBytesMax }), (position, bytes) => {
      const ps = piecesOf(write(position, bytes));
      let at = position;
      for (const p of ps) {
        if (p.position !== at || p.buf.length === 0 || p.buf.length > callBytesMax) return false;
        if (ps.length > 1 && p !== ps[ps.length - 1] && (p.position + p.buf.length) % callBytesMax !== 0) return false;
        at += p.buf.length;
      }
      return at === position + bytes;
    }),
  );
});

t.test('the file: writes of one turn, adjacent or not, land as asked; a later write of the same bytes wins', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-datafile-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = await DataFile.open(join(dir, 'data'));
  t.teardown(() => file.close());
  const expected = Buffer.alloc(800 * 1024);
  const writes: Promise<void>[] = [];
  const write = (position: number, bytes: number, fill: number, offset = 0): void => {
    const b = Buffer.alloc(offset + bytes, fill);
    writes.push(file.write(b, offset, bytes, position));
    expected.fill(fill, position, position + bytes);
  };
  for (let i = 0; i < 8; i++) write(i * 4096, 4096, i + 1); // one run of 8
  write(40_000, 1000, 20, 10); // alone, from an offset in its buffer
  write(50_000, 3000, 21);
  write(60_000, 700 * 1024, 22); // in pieces
  write(60_000 + 700 * 1024, 4096, 23); // adjacent to the last piece
  await Promise.all(writes);
  writes.length = 0;
  write(1000, 100, 30); // next turn: over earlier bytes
  write(1100, 100, 31);
  await Promise.all(writes);
  t.ok(readFileSync(join(dir, 'data')).equals(expected.subarray(0, 60_000 + 700 * 1024 + 4096)), 'the file holds every write, the later ones over the earlier');
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

t.test('skipBytes: adjacent pieces without their first bytes', async (t) => {
  const pieces = [Buffer.from('abc'), Buffer.from('defg'), Buffer.from('hi')];
  t.same(skipBytes(pieces, 0).map(String), ['abc', 'defg', 'hi']);
  t.same(skipBytes(pieces, 3).map(String), ['defg', 'hi'], 'a whole piece');
  t.same(skipBytes(pieces, 5).map(String), ['fg', 'hi'], 'into a piece');
  t.same(skipBytes(pieces, 9).map(String), [], 'all of it');
  t.same(pieces.map(String), ['abc', 'defg', 'hi'], 'the list given is not changed');
});

t.test('inline writes: small runs written on the loop\'s thread; a slow one sends the next ones to the write threads for a while', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-datafile-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const threads = new WriteThreads();
  t.teardown(() => threads.stop());
  // The clock moves `stepMs` at each look: 0, a fast disk; 30, every inline run takes 30 ms.
  let nowMs = 0;
  let stepMs = 0;
  const inline = new InlineWrites(() => (nowMs += stepMs));
  const path = join(dir, 'data');
  const file = await DataFile.open(path, { threads, inline });
  t.teardown(() => file.close());
  const expected = Buffer.alloc(1024 * 1024);
  const turn = (positions: number[], fill: number, bytes = 4096): Promise<void[]> => {
    for (const p of positions) expected.fill(fill, p, p + bytes);
    return Promise.all(positions.map((p) => file.write(Buffer.alloc(bytes, fill), 0, bytes, p)));
  };
  const scattered = [0, 65536, 131072, 196608, 262144, 327680];
  await turn([0, 4096, 8192, ...scattered.slice(1)], 1); // six runs, the first of three writes
  await turn([524288], 2, 65536); // a run of 64 KiB: the pool
  t.same(inline.counts, { runs: 6, writes: 8, slow: 0 }, 'the six small runs inline, the adjacent writes as one');
  t.equal(threads.counts.batches, 0, 'none to the write threads');
  stepMs = 10;
  await turn(scattered, 3);
  t.same(inline.counts, { runs: 6 + 6, writes: 8 + 6, slow: 0 }, 'runs of 10 ms: still inline');
  stepMs = 30;
  await turn(scattered, 3);
  t.same(inline.counts, { runs: 13, writes: 15, slow: 1 }, 'a run that took 30 ms: inline writes turned off after it');
  t.same([threads.counts.batches, threads.counts.writes], [1, 5], 'the turn\'s other five runs went to the write threads as one batch');
  stepMs = 0;
  nowMs += 1_000;
  await turn(scattered, 4);
  t.same([inline.counts.runs, threads.counts.writes], [13, 11], 'still off 1 s later: the next turn\'s six runs to the threads too');
  nowMs += 5_000;
  await turn(scattered, 5);
  t.same([inline.counts.runs, inline.counts.slow, threads.counts.writes], [19, 1, 11], '5 s after that: inline again');
  t.ok(readFileSync(path).equals(expected.subarray(0, 524288 + 65536)), 'every write landed, whichever way it went');
});
