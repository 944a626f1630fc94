// The simulated disk (test/sim/disk.ts): its durability model, then the real page store on it,
// crashed at seeded random points: what was acknowledged durable reads back, and no block ever
// shows data that was not written to it.

import t from 'tap';
import { ManualEnv } from '../src/env/manual';
import type { MediaFile, MediaKv } from '../src/store/media';
import { PageStore, type StoreVolume } from '../src/store/page-store';
import { SimMedia } from './sim/disk';

function simOn(env: ManualEnv, latencyMs?: () => number): SimMedia {
  return new SimMedia({ timers: env.timers, random: env.random, latencyMs, now: () => env.clock.monotonicMs() });
}

/** Runs the simulated time until `p` settles (bounded: a hang is a failure, not a stuck test). */
async function drive<T>(env: ManualEnv, p: Promise<T>, msMax = 100_000): Promise<T> {
  let settled = false;
  p.then(
    () => (settled = true),
    () => (settled = true),
  );
  for (let ms = 0; !settled; ms++) {
    if (ms > msMax) throw new Error(`still pending after ${msMax} simulated ms`);
    await env.run(1);
  }
  return p;
}

/** Tracks whether a promise settled without driving anything. */
function watch(p: Promise<unknown>): { settled: boolean } {
  const w = { settled: false };
  p.then(
    () => (w.settled = true),
    () => (w.settled = true),
  );
  return w;
}

async function readFile(env: ManualEnv, file: MediaFile, position: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xaa);
  await drive(env, file.read(buf, 0, length, position));
  return buf;
}

async function kvKeys(env: ManualEnv, kv: MediaKv): Promise<string[]> {
  return drive(
    env,
    (async () => {
      const keys: string[] = [];
      for await (const [key] of kv.iterator({ gte: '', lt: '\xff' })) keys.push(key);
      return keys;
    })(),
  );
}

// ---- the model ---------------------------------------------------------------------------------

t.test('every operation completes from a timer, never synchronously; reads past the end are zeros; buffers are copied', async (t) => {
  const env = new ManualEnv({ seed: 1 });
  const media = simOn(env);
  const opening = watch(media.openFile('a'));
  await new Promise((r) => setImmediate(r));
  t.equal(opening.settled, false, 'not settled before time moves');
  const file = await drive(env, media.openFile('a'));
  const data = Buffer.from('hello');
  const w = file.write(data, 0, 5, 70_000);
  data.fill(0); // the caller reuses its buffer at once
  await drive(env, w);
  t.same(await readFile(env, file, 69_998, 9), Buffer.from('\0\0hello\0\0'), 'hole before, data, zeros past the end');
  t.equal(await drive(env, file.size()), 70_005);
  t.same(await drive(env, media.listFiles()), ['a']);
  t.equal(media.memoryBytes(), 64 * 1024, 'sparse: one 64 KiB chunk holds the data, the hole costs nothing');
  await drive(env, file.datasync());
  t.equal(media.memoryBytes(), 64 * 1024, 'once durable, the durable and the latest image share that chunk');
});

t.test('a latent sector error: reads touching the sector fail until a write covers it; it outlives a crash; heal remaps it', async (t) => {
  const env = new ManualEnv({ seed: 3 });
  const media = simOn(env);
  const file = await drive(env, media.openFile('a'));
  await drive(env, file.write(Buffer.alloc(4096, 7), 0, 4096, 0));
  await drive(env, file.datasync());
  media.failSector('a', 3);
  await t.rejects(readFile(env, file, 1024, 2048), { code: 'PEERSAN_ERR_STORE_READ' }, 'a read over sector 3 fails (StoreReadError)');
  t.same(await readFile(env, file, 0, 1536), Buffer.alloc(1536, 7), 'the sectors around it read');
  media.crash();
  const again = await drive(env, media.openFile('a'));
  await t.rejects(readFile(env, again, 1536, 512), { code: 'PEERSAN_ERR_STORE_READ' }, 'still failing after a crash (it is on the medium)');
  await drive(env, again.write(Buffer.alloc(512, 9), 0, 512, 1536));
  t.same(await readFile(env, again, 1536, 512), Buffer.alloc(512, 9), 'rewritten: it reads');
  media.failSector('a', 5);
  media.healSectors();
  t.same(await readFile(env, again, 2560, 512), Buffer.alloc(512, 7), 'healed: the data under it reads again');
  const drawn = media.failWrittenSector(env.random);
  t.ok(drawn && drawn.name === 'a' && drawn.sector < 128, `a drawn sector lies in a written chunk (${JSON.stringify(drawn)})`);
});

t.test('KV: ordered range iteration, clear of a range, isEmpty, values copied both ways', async (t) => {
  const env = new ManualEnv({ seed: 2 });
  const kv = await drive(env, simOn(env).openKv());
  t.equal(await drive(env, kv.isEmpty()), true);
  const value = Buffer.from('v');
  for (const key of ['b/2', 'a/1', 'b/1', 'c/1']) await drive(env, kv.put(key, value, { sync: false }));
  value.fill(0);
  t.same(await kvKeys(env, kv), ['a/1', 'b/1', 'b/2', 'c/1'], 'key order');
  const got = await drive(env, kv.get('a/1'));
  t.same(got, Buffer.from('v'), 'the value as put, not as the caller changed its buffer after');
  got!.fill(0);
  t.same(await drive(env, kv.get('a/1')), Buffer.from('v'), 'a value read is the caller\'s to change');
  await drive(env, kv.clear({ gte: 'b/', lt: 'b0' }));
  t.same(await kvKeys(env, kv), ['a/1', 'c/1'], 'the range is gone, its neighbours stay');
  t.equal(await drive(env, kv.get('b/1')), undefined);
  t.equal(await drive(env, kv.isEmpty()), false);
});

t.test('file writes before a completed datasync survive a crash; later writes may be lost, whole', async (t) => {
  const outcomes = new Set<string>();
  for (let seed = 1; seed <= 40; seed++) {
    const env = new ManualEnv({ seed });
    const media = simOn(env);
    const file = await drive(env, media.openFile('f'));
    await drive(env, file.write(Buffer.alloc(100, 1), 0, 100, 0));
    await drive(env, file.datasync());
    await drive(env, file.write(Buffer.alloc(100, 2), 0, 100, 50)); // overlaps the synced write
    await drive(env, file.write(Buffer.alloc(10, 3), 0, 10, 1000));
    media.crash();
    const again = await drive(env, media.openFile('f'));
    const head = await readFile(env, again, 0, 150);
    t.ok(head.subarray(0, 50).equals(Buffer.alloc(50, 1)), `seed ${seed}: the synced bytes not overwritten since survive`);
    const tail = head.subarray(50);
    t.ok(tail.equals(Buffer.alloc(100, 2)) || tail.equals(Buffer.concat([Buffer.alloc(50, 1), Buffer.alloc(50)])), `seed ${seed}: the unsynced write is there whole or not at all`);
    const far = await readFile(env, again, 1000, 10);
    t.ok(far.equals(Buffer.alloc(10, 3)) || far.equals(Buffer.alloc(10)), `seed ${seed}: second unsynced write whole or not at all`);
    outcomes.add(`${tail[0]}/${far[0]}`);
  }
  t.same([...outcomes].sort(), ['1/0', '1/3', '2/0', '2/3'], 'each unsynced write survives in some seeds and not in others, independently');
});

t.test('a datasync covers only the writes completed before it was called', async (t) => {
  // Latencies by operation: openFile, the two racing ops, then the rest at 1 ms.
  type Order = 'write, then sync' | 'write and sync' | 'sync and write';
  const race = async (seed: number, latencies: number[], order: Order): Promise<boolean> => {
    const env = new ManualEnv({ seed });
    let n = 0;
    const media = simOn(env, () => latencies[n++] ?? 1);
    const file = await drive(env, media.openFile('f'));
    const write = (): Promise<void> => file.write(Buffer.alloc(4, 9), 0, 4, 0);
    if (order === 'write, then sync') await drive(env, write());
    const ops = order === 'sync and write' ? [file.datasync(), write()] : [order === 'write and sync' ? write() : undefined, file.datasync()];
    await drive(env, Promise.all(ops));
    t.same(await readFile(env, file, 0, 4), Buffer.alloc(4, 9), 'reads see the write');
    media.crash();
    return (await readFile(env, await drive(env, media.openFile('f')), 0, 4)).equals(Buffer.alloc(4, 9));
  };
  const count = async (latencies: number[], order: Order): Promise<number> => {
    let kept = 0;
    for (let seed = 1; seed <= 20; seed++) if (await race(seed, latencies, order)) kept++;
    return kept;
  };
  t.equal(await count([1, 1, 1], 'write, then sync'), 20, 'a write completed before the sync was called: always kept');
  const inFlight = await count([1, 10, 1], 'write and sync');
  t.ok(inFlight > 0 && inFlight < 20, `a write still in flight when the sync was called: kept in ${inFlight} of 20`);
  const during = await count([1, 10, 1], 'sync and write');
  t.ok(during > 0 && during < 20, `a write issued after the sync and completed before it: kept in ${during} of 20`);
});

t.test('KV: a crash keeps a prefix of the unsynced ops; a synced op keeps itself and all before it', async (t) => {
  const kept = new Set<number>();
  for (let seed = 1; seed <= 60; seed++) {
    const env = new ManualEnv({ seed });
    const media = simOn(env);
    const kv = await drive(env, media.openKv());
    for (let i = 0; i < 4; i++) await drive(env, kv.put(`a${i}`, Buffer.from([i]), { sync: false }));
    await drive(env, kv.put('a4', Buffer.from([4]), { sync: true }));
    for (let i = 5; i < 10; i++) await drive(env, kv.put(`a${i}`, Buffer.from([i]), { sync: false }));
    await drive(env, kv.batch([{ type: 'del', key: 'a0' }, { type: 'put', key: 'b', value: Buffer.from('x') }], { sync: false }));
    media.crash();
    const keys = await kvKeys(env, await drive(env, media.openKv()));
    const survivors = keys.filter((k) => k.startsWith('a')).map((k) => Number(k.slice(1)));
    const batchKept = keys.includes('b');
    const expected = ['a0', 'a1', 'a2', 'a3', 'a4', 'a5', 'a6', 'a7', 'a8', 'a9'].slice(0, Math.max(...survivors) + 1);
    t.same(
      keys,
      batchKept ? [...expected.slice(1), 'b'] : expected,
      `seed ${seed}: a prefix of the log, the batch all or nothing (and only after every op before it)`,
    );
    t.ok(survivors.length >= 4, `seed ${seed}: the synced op and those before it survive`);
    kept.add(batchKept ? 11 : Math.max(...survivors) + 1);
  }
  t.ok(kept.has(5) && kept.has(11) && kept.size >= 4, `prefixes of several lengths kept: ${[...kept].sort((a, b) => a - b)}`);
});

t.test('operations pending at the crash never complete, and neither does anything on a dead handle', async (t) => {
  const env = new ManualEnv({ seed: 3 });
  const media = simOn(env);
  const file = await drive(env, media.openFile('f'));
  const kv = await drive(env, media.openKv());
  const pending = [watch(file.write(Buffer.alloc(8, 1), 0, 8, 0)), watch(kv.put('k', Buffer.alloc(1), { sync: true }))];
  media.crash();
  const late = [watch(file.datasync()), watch(kv.get('k'))];
  const completed = media.completed;
  await env.run(1000);
  t.same(
    [...pending, ...late].map((w) => w.settled),
    [false, false, false, false],
    'none settles',
  );
  t.equal(media.completed, completed, 'none took effect');
  t.same(await readFile(env, await drive(env, media.openFile('f')), 0, 8), Buffer.alloc(8), 'the write in flight never landed');
  t.same(await kvKeys(env, await drive(env, media.openKv())), [], 'nor the put');
});

t.test('a stalled disk completes nothing before the stall ends', async (t) => {
  const env = new ManualEnv({ seed: 4 });
  const media = simOn(env);
  const file = await drive(env, media.openFile('f'));
  const start = env.clock.monotonicMs();
  media.stallUntil(start + 50);
  await drive(env, file.write(Buffer.alloc(1), 0, 1, 0));
  t.equal(env.clock.monotonicMs(), start + 50, 'the write completed when the stall ended');
  const after = env.clock.monotonicMs();
  await drive(env, file.datasync());
  t.equal(env.clock.monotonicMs(), after + 1, 'then the usual latency');
  const inFlight = file.write(Buffer.alloc(1), 0, 1, 0);
  media.stallUntil(after + 40);
  await drive(env, inFlight);
  t.equal(env.clock.monotonicMs(), after + 40, 'a stall holds an operation already in flight too');
});

// ---- the page store on the simulated disk, crashed at random points -----------------------------

const volumeId = '00000000000000c1';
const blockBytes = 4096;
const blockCount = 128; // 8 grains of 16 blocks
const grainBlocks = 16;

/** A block's bytes for write `id` at `lba`: id and lba in every 8 bytes (0 = zeros, never written). */
function blockImage(id: number, lba: number): Buffer {
  const buf = Buffer.alloc(blockBytes);
  if (id === 0) return buf;
  for (let at = 0; at < blockBytes; at += 8) {
    buf.writeUInt32LE(id, at);
    buf.writeUInt32LE(lba, at + 4);
  }
  return buf;
}

/** What one operation did to one block: the value it left and when (in event order) it started, ended, became durable. */
interface BlockOp {
  id: number;
  issuedAt: number;
  ackedAt?: number;
  durable: boolean;
}

/**
 * The host's view: every write and unmap per block, with acknowledgements, and flushes that make
 * everything acknowledged before they started durable. The initial zeros are op 0, durable (or, after a restart, what the store read).
 */
class History {
  private event = 0;
  readonly ops: BlockOp[][] = Array.from({ length: blockCount }, () => [{ id: 0, issuedAt: -1, ackedAt: -1, durable: true }]);

  /** A history whose start is what a restarted store read (checked already): each block's write, durable. */
  static from(volume: Buffer): History {
    const h = new History();
    for (let lba = 0; lba < blockCount; lba++) h.ops[lba][0].id = volume.readUInt32LE(lba * blockBytes);
    return h;
  }

  issue(id: number, lba: number, blocks: number): BlockOp[] {
    const at = this.event++;
    const mine: BlockOp[] = [];
    for (let b = lba; b < lba + blocks; b++) {
      const op: BlockOp = { id, issuedAt: at, durable: false };
      this.ops[b].push(op);
      mine.push(op);
    }
    return mine;
  }

  ack(mine: BlockOp[], durable: boolean): void {
    const at = this.event++;
    for (const op of mine) {
      op.ackedAt = at;
      op.durable ||= durable;
    }
  }

  /** A flush issued now: returns its completion, which makes durable what was acknowledged before the issue. */
  flushIssued(): () => void {
    const issuedAt = this.event++;
    return () => {
      for (const list of this.ops) for (const op of list) if (op.ackedAt !== undefined && op.ackedAt < issuedAt) op.durable = true;
    };
  }

  /** Why block `lba` reading `image` breaks the promises, or undefined when it keeps them. */
  check(lba: number, image: Buffer): string | undefined {
    const id = image.readUInt32LE(0);
    if (!image.equals(blockImage(id, id === 0 ? 0 : image.readUInt32LE(4)))) return `block ${lba} is torn or foreign`;
    if (id !== 0 && image.readUInt32LE(4) !== lba) return `block ${lba} shows block ${image.readUInt32LE(4)}'s data (write ${id})`;
    const list = this.ops[lba];
    // Zeros: the start, or any unmap.
    const candidates = list.filter((op) => op.id === id);
    if (candidates.length === 0) return `block ${lba} shows write ${id}, which never wrote it`;
    // The newest durable op: what was read must be it or something not finished before it began.
    const durable = list.filter((op) => op.durable).reduce((a, b) => (b.issuedAt > a.issuedAt ? b : a));
    const allowed = (op: BlockOp): boolean => op === durable || op.ackedAt === undefined || op.ackedAt > durable.issuedAt;
    if (!candidates.some(allowed)) return `block ${lba} lost durable op ${durable.id} (reads ${id === 0 ? 'zeros' : `write ${id}`}, acknowledged before it)`;
    return undefined;
  }
}

interface Workload {
  workers: number;
  opsPerWorker: number;
  /** Unmaps of any range too (zeros written into partial grains), not only of whole grains. */
  partialUnmaps?: boolean;
  /** Run, crash, restart and check this many times on one media (1 when absent). */
  rounds?: number;
}

/**
 * One worker: random writes (some FUA), whole-grain unmaps, flushes, and snapshots taken and
 * deleted (so writes copy on write and slots are released and reused), until the crash
 * freezes it. Only the live view is checked; a snapshot, durable with every write
 * acknowledged before it, counts as a flush.
 */
async function worker(env: ManualEnv, v: StoreVolume, h: History, nextId: () => number, w: Workload): Promise<void> {
  const r = env.random;
  for (let i = 0; i < w.opsPerWorker; i++) {
    const dice = r.int(100);
    if (dice < 8) {
      const done = h.flushIssued();
      await v.flush();
      done();
    } else if (dice < 12) {
      const done = h.flushIssued();
      await v.snapshot(`s${nextId()}`, 0);
      done();
    } else if (dice < 15) {
      const oldest = v.listSnapshots()[0];
      // Another worker may have deleted it meanwhile.
      if (oldest) await v.deleteSnapshot(oldest.id).catch((err: Error) => (err.name === 'NotFoundError' ? undefined : Promise.reject(err)));
    } else if (dice < 22) {
      const whole = !w.partialUnmaps || r.int(2) === 0;
      const blocks = whole ? grainBlocks : 1 + r.int(2 * grainBlocks);
      const lba = whole ? r.int(blockCount / grainBlocks) * grainBlocks : r.int(blockCount - blocks + 1);
      const mine = h.issue(0, lba, blocks);
      await v.unmap(lba, blocks);
      h.ack(mine, false);
    } else {
      const blocks = 1 + r.int(4);
      const lba = r.int(blockCount - blocks + 1);
      const id = nextId();
      const data = Buffer.concat(Array.from({ length: blocks }, (_, k) => blockImage(id, lba + k)));
      const fua = r.int(5) === 0;
      const mine = h.issue(id, lba, blocks);
      await v.write(lba, data, { fua });
      h.ack(mine, fua);
    }
  }
}

/**
 * One seed: run the workload, crash at a random instant, restart, read every block and check;
 * then again from what survived, for each round. Returns the failures (prefixed by the round after the first).
 */
async function crashRun(seed: number, w: Workload): Promise<string[]> {
  const env = new ManualEnv({ seed });
  const media = simOn(env, () => 1 + env.random.int(3));
  const failures: string[] = [];
  let h = new History();
  let v = await drive(env, (await drive(env, PageStore.openOn(media))).openVolume(volumeId, { blockBytes, blockCount }));
  let id = 0;
  for (let round = 1; round <= (w.rounds ?? 1); round++) {
    const note = (why: string): void => void failures.push(round === 1 ? why : `round ${round}: ${why}`);
    const crashAtMs = 1 + env.random.int(150);
    env.timers.setTimeout(() => media.crash(), crashAtMs);
    for (let k = 0; k < w.workers; k++) worker(env, v, h, () => ++id, w).catch((err: Error) => note(`worker ${k}: ${err.stack}`));
    await env.run(crashAtMs);
    const again = await drive(env, PageStore.openOn(media));
    v = await drive(env, again.openVolume(volumeId, { blockBytes, blockCount }));
    const all = await drive(env, v.read(0, blockCount));
    // (A crash that lost every key leaves an empty store, which rightly counts as a first start.)
    if (again.wasClean && !all.equals(Buffer.alloc(all.length))) note('the restarted store holds data and thinks it was shut down cleanly');
    for (let lba = 0; lba < blockCount; lba++) {
      const why = h.check(lba, all.subarray(lba * blockBytes, (lba + 1) * blockBytes));
      if (why) note(why);
    }
    h = History.from(all);
  }
  return failures;
}

t.test('the history checker fails on lost durable writes and on foreign data (negative controls)', async (t) => {
  const h = new History();
  const first = h.issue(1, 5, 1);
  h.ack(first, true);
  const second = h.issue(2, 5, 1);
  h.ack(second, false);
  t.equal(h.check(5, blockImage(2, 5)), undefined, 'the newer write');
  t.equal(h.check(5, blockImage(1, 5)), undefined, 'the durable one');
  t.match(h.check(5, blockImage(0, 0)), /lost durable op 1/, 'zeros after a FUA write');
  t.match(h.check(5, blockImage(2, 6)), /block 6's data/, "another block's data");
  t.match(h.check(5, blockImage(3, 5)), /never wrote it/, 'a write that did not target the block');
  const torn = blockImage(2, 5);
  torn.fill(0, 2048);
  t.match(h.check(5, torn), /torn/, 'half a write');
  const done = h.flushIssued();
  done();
  t.match(h.check(5, blockImage(1, 5)), /lost durable op 2/, 'the older write after a flush made the newer durable');
});

// Crash-ordering bugs this simulation found in the page store; each seed fails without its fix.
const regressions: [seed: number, what: string][] = [
  // A first write to a grain put its map without sync; a FUA write into that grain was acknowledged
  // after an fdatasync of the data alone; the power loss dropped the map: "block 6 lost durable op 12 (reads zeros)".
  [26, 'a FUA write in place syncs the maps earlier writes put without sync'],
  // A write in place into a slot another write had just filled was acknowledged before that write
  // handed the slot's map over (it was still in its FUA fdatasync); a flush acknowledged after it
  // synced the log without that map: "block 98 lost durable op 59 (reads zeros)". (A kill -9 there
  // loses it too.)
  [2182, 'a write in place into a new slot waits until the slot\'s map was handed over'],
  // A write into a slot freed by an unmap put its map without sync; the power loss kept the map
  // and lost the slot's new bytes: "block 28 shows block 44's data (write 9)".
  [54, 'a reused slot is durable before its map is handed to LevelDB'],
  // Copy-on-write into a fresh slot, same race: the grain read zeros instead of its data, which a
  // snapshot still shares: "block 115 lost durable op 9 (reads zeros)".
  [8, 'a fresh slot replacing a snapshot-shared grain is durable before its map is handed to LevelDB'],
];
for (const [seed, what] of regressions) {
  t.test(`seed ${seed}: ${what}`, async (t) => {
    t.same(await crashRun(seed, { workers: 3, opsPerWorker: 60 }), []);
  });
}

t.test('the page store on SimMedia, crashed at seeded random points: durable writes read back, no foreign data', async (t) => {
  const seeds = Number(process.env.SIM_DISK_SEEDS ?? 300);
  const started = Date.now();
  const failed: string[] = [];
  for (let seed = 1; seed <= seeds; seed++) {
    const failures = await crashRun(seed, { workers: 3, opsPerWorker: 60, partialUnmaps: true, rounds: 3 });
    if (failures.length > 0) failed.push(`seed ${seed}: ${failures.slice(0, 3).join('; ')}${failures.length > 3 ? ` (+${failures.length - 3})` : ''}`);
  }
  t.same(failed, [], `${seeds} seeds`);
  t.ok(Date.now() - started < 20_000, `bounded in time: ${Date.now() - started} ms`);
});
