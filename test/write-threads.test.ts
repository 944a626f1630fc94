// The store's write threads (src/store/write-threads.ts) and DataFile's use of it: a batch's
// writes land where they asked, an error reaches its own write only, every write is answered
// exactly once even when the thread ends under it, a new thread takes over, and when no
// staging buffer is free DataFile writes through the pool instead.

import t from 'tap';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DataFile } from '../src/store/data-file';
import { stagingBytes, WriteThreads, type ThreadWrite } from '../src/store/write-threads';

const dir = mkdtempSync(join(tmpdir(), 'peersan-write-thread-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

/** A write of `bytes` bytes of `fill` at `position`, in `pieces` adjacent pieces; its answer lands in `answers`. */
function threadWrite(fd: number, position: number, bytes: number, fill: number, answers: (NodeJS.ErrnoException | null)[], pieces = 1): ThreadWrite {
  const each = bytes / pieces;
  return { fd, position, pieces: Array.from({ length: pieces }, () => Buffer.alloc(each, fill)), done: (err) => answers.push(err) };
}

const settle = (answers: unknown[], n: number): Promise<void> => new Promise((resolve) => {
  const poll = (): void => { if (answers.length >= n) resolve(); else setTimeout(poll, 2); };
  poll();
});

/** Write threads and one file under `dir`, both ended by the test's teardown, and a list for the answers. */
function threadAndFile(t: { teardown(fn: () => unknown): void }, name: string) {
  const thread = new WriteThreads();
  t.teardown(() => thread.stop());
  const fd = openSync(join(dir, name), 'w+');
  t.teardown(() => closeSync(fd));
  return { thread, fd, answers: [] as (NodeJS.ErrnoException | null)[] };
}

t.test('a batch: every write lands (pieces joined), two files at once, each answered once', async (t) => {
  const thread = new WriteThreads();
  t.teardown(() => thread.stop());
  const [a, b] = [join(dir, 'a'), join(dir, 'b')];
  const [fa, fb] = [openSync(a, 'w+'), openSync(b, 'w+')];
  t.teardown(() => { closeSync(fa); closeSync(fb); });
  const answers: (NodeJS.ErrnoException | null)[] = [];
  t.ok(thread.send([threadWrite(fa, 8192, 4096, 1, answers), threadWrite(fb, 0, 512, 2, answers), threadWrite(fa, 0, 4096, 3, answers, 4)]), 'taken');
  await settle(answers, 3);
  t.same(answers, [null, null, null], 'three answers, no error');
  t.same(thread.counts, { batches: 1, writes: 3, refused: 0 }, 'counted: one batch of three');
  const fileA = readFileSync(a);
  t.ok(fileA.subarray(0, 4096).equals(Buffer.alloc(4096, 3)) && fileA.subarray(4096, 8192).equals(Buffer.alloc(4096)) && fileA.subarray(8192).equals(Buffer.alloc(4096, 1)), 'file a: both writes where asked, nothing between');
  t.ok(readFileSync(b).equals(Buffer.alloc(512, 2)), 'file b');
});

t.test('an error reaches its own write only, with its errno code', { skip: existsSync('/dev/full') ? false : 'no /dev/full' }, async (t) => {
  const thread = new WriteThreads();
  t.teardown(() => thread.stop());
  const ok = openSync(join(dir, 'ok'), 'w+');
  const full = openSync('/dev/full', 'w');
  t.teardown(() => { closeSync(ok); closeSync(full); });
  const answers: (NodeJS.ErrnoException | null)[] = [];
  thread.send([threadWrite(ok, 0, 4096, 1, answers), threadWrite(full, 0, 4096, 1, answers), threadWrite(ok, 4096, 4096, 2, answers)]);
  await settle(answers, 3);
  t.equal(answers[0], null);
  t.equal(answers[1]?.code, 'ENOSPC', `the write to /dev/full: ${answers[1]?.message}`);
  t.equal(answers[2], null, 'the write after it still done');
  t.equal(readFileSync(join(dir, 'ok')).length, 8192);
});

t.test('the thread ended under its batches: each write answered once (done or EIO), then a new thread works', async (t) => {
  const { thread, fd, answers } = threadAndFile(t, 'stop');
  let sent = 0;
  for (let batch = 0; batch < 8; batch++) {
    const writes = Array.from({ length: 32 }, (_, i) => threadWrite(fd, (batch * 32 + i) * 4096, 4096, 1, answers));
    t.ok(thread.send(writes));
    sent += writes.length;
  }
  await thread.stop();
  await settle(answers, sent);
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.equal(answers.length, sent, 'every write answered exactly once');
  t.ok(answers.every((a) => a === null || a.code === 'EIO'), `done or EIO (${answers.filter((a) => a).length} failed)`);
  const after: (NodeJS.ErrnoException | null)[] = [];
  t.ok(thread.send([threadWrite(fd, 0, 4096, 9, after)]), 'the next batch is taken');
  await settle(after, 1);
  t.same(after, [null], 'and written by a new thread');
  t.ok(readFileSync(join(dir, 'stop')).subarray(0, 4096).equals(Buffer.alloc(4096, 9)));
});

t.test('staging buffers are bounded: with all in flight, send says no', async (t) => {
  const { thread, fd, answers } = threadAndFile(t, 'bounded');
  let taken = 0;
  while (thread.send([threadWrite(fd, taken * 4096, 4096, 1, answers)])) taken++;
  t.equal(taken, 16, 'sixteen batches in flight at most');
  t.equal(thread.counts.refused, 1, 'the refusal counted');
  await settle(answers, taken);
  t.ok(thread.send([threadWrite(fd, 0, 4096, 1, answers)]), 'once answered, buffers are free again');
  await settle(answers, taken + 1);
});

t.test('DataFile: more small writes in one turn than the thread can stage go through the pool; all land; close waits for them', async (t) => {
  const path = join(dir, 'many');
  const thread = new WriteThreads();
  t.teardown(() => thread.stop());
  const file = await DataFile.open(path, { threads: thread });
  // Scattered 4 KiB writes (none adjacent): 2,048 of them is 8 MiB, twice what 16 staging buffers hold.
  const count = (2 * 16 * stagingBytes) / 4096;
  const writes: Promise<void>[] = [];
  let settled = 0;
  let failed = 0;
  for (let i = 0; i < count; i++) writes.push(file.write(Buffer.alloc(4096, (i % 250) + 1), 0, 4096, i * 8192).then(() => { settled++; }, () => { failed++; }));
  await file.close();
  t.equal(settled, count, `every write settled before close returned (${failed} failed)`);
  await Promise.all(writes);
  const bytes = readFileSync(path);
  let wrong = 0;
  for (let i = 0; i < count; i++) if (!bytes.subarray(i * 8192, i * 8192 + 4096).equals(Buffer.alloc(4096, (i % 250) + 1))) wrong++;
  t.equal(wrong, 0, 'each write where it asked');
});

t.test('DataFile: a turn with four or more small runs sends them as one batch; fewer, or large runs, go through the pool', async (t) => {
  class CountingThread extends WriteThreads {
    batches: number[] = [];
    override send(writes: ThreadWrite[]): boolean {
      this.batches.push(writes.length);
      return super.send(writes);
    }
  }
  const thread = new CountingThread();
  t.teardown(() => thread.stop());
  const path = join(dir, 'choice');
  const file = await DataFile.open(path, { threads: thread });
  t.teardown(() => file.close());
  const turn = (positions: number[], bytes = 4096): Promise<void[]> => Promise.all(positions.map((p) => file.write(Buffer.alloc(bytes, 7), 0, bytes, p)));
  await turn([0, 4096, 8192, 65536, 131072]); // three runs: the first of three adjacent writes
  t.same(thread.batches, [], 'three small runs: the pool');
  await turn([0, 65536, 131072, 196608, 262144, 262144 + 4096]); // five runs
  t.same(thread.batches, [5], 'five small runs: one batch of five');
  await turn(Array.from({ length: 12 }, (_, i) => 300_000 + i * 8192));
  t.same(thread.batches, [5, 8, 4], 'twelve: batches of eight and four (one for each thread)');
  await turn([0, 65536 * 4, 65536 * 8, 65536 * 12], 65536); // four runs of 64 KiB
  t.same(thread.batches, [5, 8, 4], 'runs of 64 KiB: the pool');
  t.equal(readFileSync(path).length, 65536 * 13, 'all written');
});
