// The simulator's history checker and host workload (issue 16, test/sim/): hand-made histories
// for each rule, passing and failing; then a property: a correct in-memory disk (a volatile
// cache over a durable copy, crashes losing the cache, each command taking effect at random
// instants under a ManualEnv) driven by the Workload gives no violation over hundreds of seeds,
// while disks with a known bug are caught, each by the invariant its bug breaks.

import t from 'tap';
import { sleep } from '../src/env/env';
import { ManualEnv, SeededRandom } from '../src/env/manual';
import type { BlockBackend, CompareAndWriteResult, LbaExtent } from '../src/store/types';
import { MemoryBackend } from './helpers/memory-backend';
import type { Route } from '../src/routing/table';
import { check, traceOf, type Violation } from './sim/checker';
import { checkConvergence, checkProtection, checkRouteHistory, type CopiesHeld, type RoutePut, type RouteRules } from './sim/copies';
import { decodeBlock, decodeBlocks, encodeBlock, encodeBlocks, History, type Op, type OpStart, type Outcome, type Seen } from './sim/history';
import { recordSnapshot, Workload, type Geometry } from './sim/workload';

const bs = 512;

t.test('a block names its write and its lba: zeros, torn, misplaced and corrupt blocks are told apart', async (t) => {
  t.equal(decodeBlock(encodeBlock(7, 100, bs), 100), 7);
  t.equal(decodeBlock(encodeBlock(0xffff_ffff, 0, bs), 0), 0xffff_ffff);
  t.equal(decodeBlock(Buffer.alloc(bs), 3), 0, 'zeros: never written');
  t.equal(decodeBlock(encodeBlock(7, 100, bs), 101), 'garbage', 'a block written at 100 read at 101: misplaced');
  const torn = Buffer.concat([encodeBlock(7, 100, bs).subarray(0, bs / 2), encodeBlock(8, 100, bs).subarray(bs / 2)]);
  t.equal(decodeBlock(torn, 100), 'garbage', 'half of one write, half of another');
  const flipped = encodeBlock(7, 100, bs);
  flipped[bs - 1] ^= 1;
  t.equal(decodeBlock(flipped, 100), 'garbage', 'one bit flipped in the last byte');
  const nearlyZero = Buffer.alloc(bs);
  nearlyZero[300] = 1;
  t.equal(decodeBlock(nearlyZero, 0), 'garbage', 'zeros but one byte');
  t.same(decodeBlocks(encodeBlocks(9, 10, 3, bs), 10, bs, 3), [9, 9, 9]);
  t.same(decodeBlocks(encodeBlocks(9, 10, 3, bs), 11, bs, 3), ['garbage', 'garbage', 'garbage'], 'the same blocks one lba off');
  t.same(decodeBlocks(encodeBlocks(9, 10, 2, bs), 10, bs, 3), [9, 9, 'garbage'], 'a short read: the missing block is garbage');
  t.throws(() => encodeBlock(0, 1, bs), RangeError, 'writeId 0 is the zeros');
});

// Hand-made histories: each op is begun and ended at stated times (ms); `at: [start]` leaves
// it in flight. Ops are recorded in the order the calls are made, which breaks ties in ms.
interface Given {
  lba?: number;
  blocks?: number;
  at: [number, number?];
  fua?: boolean;
  outcome?: Outcome;
  seen?: Seen[];
  volume?: string;
}

class Script {
  readonly h = new History();

  op(kind: Op['kind'], g: Given): Op {
    const start: OpStart = { host: 0, peer: 'p1', kind, lba: g.lba ?? 0, blocks: g.blocks ?? g.seen?.length ?? 1, fua: g.fua, volume: g.volume };
    const op = this.h.begin(start, g.at[0]);
    if (g.at[1] !== undefined) this.h.end(op, g.outcome ?? 'ok', g.seen, g.at[1]);
    return op;
  }

  write(g: Given): number {
    return this.op('write', g).id;
  }

  read(g: Given): number {
    return this.op('read', g).id;
  }

  flush(at: [number, number?]): void {
    this.op('flush', { at, blocks: 0 });
  }

  crash(atMs: number): void {
    this.h.crash('p2', atMs);
  }

  check(): Violation[] {
    return check(this.h);
  }
}

function invariants(vs: Violation[]): string[] {
  return vs.map((v) => `${v.invariant}@${v.opId}/${v.lba}`);
}

t.test('reads: the latest answered write or one in flight; an older one is stale, or lost when the newer was durable', async (t) => {
  let s = new Script();
  let w1 = s.write({ lba: 5, at: [0, 1] });
  s.read({ lba: 5, at: [2, 3], seen: [w1] });
  s.read({ lba: 4, blocks: 2, at: [2, 3], seen: [0, w1] });
  t.same(s.check(), [], 'the answered write, and zeros next to it');

  s = new Script();
  s.write({ lba: 5, at: [0, 10] });
  s.read({ lba: 5, at: [2, 3], seen: [0] });
  t.same(s.check(), [], 'zeros while the write is in flight');

  s = new Script();
  w1 = s.write({ lba: 5, at: [0, 1] });
  let r = s.read({ lba: 5, at: [2, 3], seen: [0] });
  let vs = s.check();
  t.same(invariants(vs), [`stale-read@${r}/5`], 'zeros after an answered (not durable) write: stale');
  t.match(vs[0].message, `read #${r} (host 0 via p1, 2–3 ms) saw zeros at lba 5, but write #${w1} (host 0 via p1, 0–1 ms) was answered`);

  s = new Script();
  w1 = s.write({ lba: 5, at: [0, 1], fua: true });
  r = s.read({ lba: 5, at: [2, 3], seen: [0] });
  t.same(invariants(s.check()), [`acknowledged-write-lost@${r}/5`], 'zeros after an answered FUA write: lost');

  s = new Script();
  w1 = s.write({ lba: 5, at: [0, 1] });
  let w2 = s.write({ lba: 5, at: [2, 3] });
  r = s.read({ lba: 5, at: [4, 5], seen: [w1] });
  s.read({ lba: 5, at: [4, 5], seen: [w2] });
  vs = s.check();
  t.same(invariants(vs), [`stale-read@${r}/5`], 'the older of two sequential writes: stale');
  t.match(vs[0].message, `saw write #${w1} (host 0 via p1, 0–1 ms) at lba 5, but write #${w2} (host 0 via p1, 2–3 ms) was answered`);

  s = new Script();
  w1 = s.write({ lba: 5, at: [0, 2] });
  w2 = s.write({ lba: 5, at: [1, 3] });
  s.read({ lba: 5, at: [4, 5], seen: [w1] });
  s.read({ lba: 5, at: [4, 5], seen: [w2] });
  t.same(s.check(), [], 'either of two overlapping writes');

  s = new Script();
  w1 = s.write({ lba: 5, at: [0, 1] });
  w2 = s.write({ lba: 5, at: [2, 3] });
  s.flush([3.5, 3.8]);
  r = s.read({ lba: 5, at: [4, 5], seen: [w1] });
  t.same(invariants(s.check()), [`acknowledged-write-lost@${r}/5`], 'a flush that began after the newer write was answered makes it durable');

  s = new Script();
  w1 = s.write({ lba: 5, at: [0, 1] });
  w2 = s.write({ lba: 5, at: [2, 3] });
  s.flush([2.5, 3.8]);
  r = s.read({ lba: 5, at: [4, 5], seen: [w1] });
  t.same(invariants(s.check()), [`stale-read@${r}/5`], 'a flush that began before the write was answered does not');
});

t.test('crashes excuse writes that were not durable, and only those', async (t) => {
  const s = new Script();
  const w1 = s.write({ lba: 5, at: [0, 1], fua: true });
  const w2 = s.write({ lba: 5, at: [2, 3] });
  s.crash(4);
  s.read({ lba: 5, at: [5, 6], seen: [w1] });
  s.read({ lba: 5, at: [5, 6], seen: [w2] });
  const r = s.read({ lba: 5, at: [5, 6], seen: [0] });
  t.same(invariants(s.check()), [`acknowledged-write-lost@${r}/5`], 'after a crash: the durable write or the later one, never what the durable one replaced');
  s.write({ lba: 6, at: [0, 1] });
  s.read({ lba: 5, at: [7, 8], seen: [w2] });
  t.same(traceOf(s.h, s.check()[0]), [
    `write #${w1} (host 0 via p1, 0–1 ms, fua)`,
    `write #${w2} (host 0 via p1, 2–3 ms)`,
    'crash of p2 at 4 ms',
    `read #${r - 2} (host 0 via p1, 5–6 ms) saw ${w1}`,
    `read #${r - 1} (host 0 via p1, 5–6 ms) saw ${w2}`,
    `read #${r} (host 0 via p1, 5–6 ms) saw 0  <- acknowledged-write-lost`,
  ], 'the trace of a violation: what touched its block before it was answered, in order');

  // A FUA write, a plain one answered at 3, maybe a flush, a crash; a read at 5..6 sees the FUA one.
  const oldAfterCrash = (flushAt: [number, number] | undefined, crashAt: number): string[] => {
    const s = new Script();
    const durable = s.write({ lba: 5, at: [0, 1], fua: true });
    s.write({ lba: 5, at: [2, 3] });
    if (flushAt) s.flush(flushAt);
    s.crash(crashAt);
    s.read({ lba: 5, at: [5, 6], seen: [durable] });
    return s.check().map((v) => v.invariant);
  };
  t.same(oldAfterCrash(undefined, 4), [], 'the plain write may have been lost');
  t.same(oldAfterCrash([3.1, 3.5], 4), ['acknowledged-write-lost'], 'flushed before the crash: not excused');
  t.same(oldAfterCrash([3.1, 4.5], 4), [], 'a flush answered after the crash came too late');
  t.same(oldAfterCrash([2.5, 3.5], 4), [], 'a flush begun before the write was answered does not cover it');
  t.same(oldAfterCrash(undefined, 7), ['stale-read'], 'a crash after the read excuses nothing');
  t.same(oldAfterCrash(undefined, 5.5), [], 'a crash during the read does: the read may have been served after it');
});

t.test('failed and unanswered writes may land any time later; what no write put there is a phantom', async (t) => {
  const s = new Script();
  const w1 = s.write({ lba: 5, at: [0, 1] });
  const failed = s.write({ lba: 5, at: [2, 3], outcome: 'error' });
  const hanging = s.write({ lba: 5, at: [4] });
  s.read({ lba: 5, at: [10, 11], seen: [failed] });
  s.read({ lba: 5, at: [12, 13], seen: [hanging] });
  s.read({ lba: 5, at: [14, 15], seen: [w1] });
  t.same(s.check(), [], 'a failed write neither hides the earlier one nor is hidden');

  const future = s.write({ lba: 5, at: [20, 21] });
  const miscompared = s.op('caw', { lba: 5, at: [22, 23], outcome: 'miscompare', seen: [0] }).id;
  const r1 = s.read({ lba: 5, at: [16, 17], seen: [future] });
  const r2 = s.read({ lba: 6, at: [30, 31], seen: [w1] });
  const r3 = s.read({ lba: 5, at: [30, 31], seen: [miscompared] });
  const r4 = s.read({ lba: 5, at: [30, 31], seen: [999] });
  const r5 = s.read({ lba: 5, at: [30, 31], seen: [r1] });
  const r6 = s.read({ lba: 5, at: [30, 31], seen: [w1], volume: 'other' });
  const vs = s.check();
  t.same(invariants(vs), [r1, r2, r3, r4, r5, r6].map((r) => `phantom-read@${r}/${r === r2 ? 6 : 5}`), 'a write from the future, another lba, a miscompared caw, no op, a read, another volume');
  t.match(vs[5].message, `wrote volume (none)`);
  t.match(vs[0].message, `began after the read was answered`);
  t.match(vs[1].message, `did not write that lba`);
  t.match(vs[2].message, `caw #${miscompared} (host 0 via p1, 22–23 ms, miscompare) answered MISCOMPARE, so it must have written nothing`);

  const g = new Script();
  const r = g.read({ lba: 8, blocks: 2, at: [0, 1], seen: [0, 'garbage'] });
  t.same(invariants(g.check()), [`garbage@${r}/9`], 'a garbage block');
});

t.test('a caw that succeeded read what it compared; volumes are apart; same-ms events keep the order they were recorded in', async (t) => {
  let s = new Script();
  const w1 = s.write({ lba: 5, at: [0, 1] });
  const caw = s.op('caw', { lba: 5, at: [2, 3], seen: [0] }).id;
  s.read({ lba: 5, at: [4, 5], seen: [caw] });
  t.same(invariants(s.check()), [`stale-read@${caw}/5`], 'the caw compared against zeros after write #1 was answered');
  s = new Script();
  s.write({ lba: 5, at: [0, 1] });
  s.op('caw', { lba: 5, at: [2, 3], seen: [w1] });
  t.same(s.check(), [], 'against the answered write: fine');

  s = new Script();
  const known = s.write({ lba: 5, blocks: 2, at: [0, 1] });
  const bad = s.op('caw', { lba: 5, blocks: 2, at: [2, 3], outcome: 'miscompare', seen: [known, known] }).id;
  s.op('caw', { lba: 5, blocks: 2, at: [2, 3], outcome: 'miscompare', seen: [known, 0] });
  let vs = s.check();
  t.same(invariants(vs), [`false-miscompare@${bad}/5`], 'a caw miscompared against the only value its blocks could hold');
  t.match(vs[0].message, `compared against #${known}, #${known}, the only values`);
  s.write({ lba: 5, at: [4, 5] });
  t.same(invariants(s.check()), [`false-miscompare@${bad}/5`], 'a write begun after the caw was answered changes nothing');
  s.write({ lba: 6, at: [1.5, 2.5], outcome: 'error' });
  t.same(s.check(), [], 'a failed write to one of its blocks may have landed: a miscompare is fine');
  s = new Script();
  let only = s.write({ lba: 5, at: [0, 1] });
  s.write({ lba: 5, at: [2.5] });
  s.op('caw', { lba: 5, at: [2, 3], outcome: 'miscompare', seen: [only] });
  s.op('caw', { lba: 5, at: [2, 3], outcome: 'miscompare', seen: [0] });
  t.same(s.check(), [], 'nor with a write begun during the caw, nor against an older value');
  s = new Script();
  only = s.write({ lba: 5, at: [0, 1] });
  s.crash(2);
  s.op('caw', { lba: 5, at: [3, 4], outcome: 'miscompare', seen: [only] });
  t.same(s.check(), [], 'nor after a crash that may have lost the write');

  s = new Script();
  s.write({ lba: 5, at: [0, 1], volume: 'a' });
  s.read({ lba: 5, at: [2, 3], seen: [0], volume: 'b' });
  t.same(s.check(), [], 'a write to volume a does not hide zeros of volume b');
  const onA = s.read({ lba: 5, at: [2, 3], seen: [0], volume: 'a' });
  s.op('flush', { at: [1.5, 1.8], blocks: 0, volume: 'b' });
  t.same(invariants(s.check()), [`stale-read@${onA}/5`], 'a flush of volume b makes nothing of volume a durable');
  s.op('flush', { at: [1.5, 1.8], blocks: 0, volume: 'a' });
  t.same(invariants(s.check()), [`acknowledged-write-lost@${onA}/5`], 'a flush of volume a does');

  // One millisecond, two orders: the write's answer recorded before the read began, or after.
  const h = new History();
  const w = h.begin({ host: 0, peer: 'p1', kind: 'write', lba: 5, blocks: 1 }, 0);
  h.end(w, 'ok', undefined, 5);
  const late = h.begin({ host: 1, peer: 'p1', kind: 'read', lba: 5, blocks: 1 }, 5);
  h.end(late, 'ok', [0], 6);
  t.same(invariants(check(h)), [`stale-read@${late.id}/5`], 'answered, then the read began in the same ms: zeros are stale');
  const h2 = new History();
  const early = h2.begin({ host: 1, peer: 'p1', kind: 'read', lba: 5, blocks: 1 }, 0);
  const w2 = h2.begin({ host: 0, peer: 'p1', kind: 'write', lba: 5, blocks: 1 }, 0);
  h2.end(w2, 'ok', undefined, 5);
  h2.end(early, 'ok', [0], 5);
  t.same(check(h2), [], 'the read began before the write was answered, both in ms 0..5: zeros are fine');
  t.throws(() => h2.end(early, 'ok', [0], 7), /ended twice/);
  const h3 = new History();
  const durable = h3.begin({ host: 0, peer: 'p1', kind: 'write', lba: 5, blocks: 1, fua: true }, 0);
  h3.end(durable, 'ok', undefined, 1);
  const lost = h3.begin({ host: 0, peer: 'p1', kind: 'write', lba: 5, blocks: 1 }, 2);
  h3.end(lost, 'ok', undefined, 5);
  h3.crash('p2', 5);
  const after = h3.begin({ host: 1, peer: 'p1', kind: 'read', lba: 5, blocks: 1 }, 6);
  h3.end(after, 'ok', [durable.id], 7);
  t.same(check(h3), [], 'a crash recorded after the answer in the same ms may have lost the write');
});

t.test('snapshots: each block a read over the command, and the whole a consistent cut', async (t) => {
  const cut = (heldA: boolean, heldB: boolean, crashAt?: number) => {
    const s = new Script();
    const a = s.write({ lba: 10, at: [1, 2] });
    const b = s.write({ lba: 20, at: [3, 4] });
    if (crashAt !== undefined) s.crash(crashAt);
    const seen: Seen[] = Array(32).fill(0);
    if (heldA) seen[10] = a;
    if (heldB) seen[20] = b;
    const snap = s.op('snapshot', { lba: 0, at: [0.5, 5], seen });
    return { vs: s.check(), snap: snap.id };
  };
  t.same(cut(true, true).vs, [], 'A and B');
  t.same(cut(true, false).vs, [], 'A only');
  t.same(cut(false, false).vs, [], 'neither');
  const bad = cut(false, true);
  t.same(invariants(bad.vs), [`snapshot-cut@${bad.snap}/10`], 'B without A, though A was answered before B began');
  t.match(bad.vs[0].message, /holds write #2 .* at lba 20, which began after write #1 .* was answered, but snapshot #3 .* holds at lba 10 zeros/);
  t.same(cut(false, true, 2.5).vs, [], 'unless a crash may have lost A (not durable) before the snapshot ended');

  const s = new Script();
  const a = s.write({ lba: 10, blocks: 2, at: [1, 2] });
  const c = s.write({ lba: 11, at: [1.5, 2.5] });
  const b = s.write({ lba: 20, at: [3, 4] });
  const seen: Seen[] = Array(32).fill(0);
  [seen[10], seen[11], seen[20]] = [a, c, b];
  s.op('snapshot', { at: [0.5, 5], seen });
  t.same(s.check(), [], 'a write that overlapped A may stand in for it');
  const late = s.op('snapshot', { at: [6, 7], seen: Array(32).fill(0) }).id;
  t.same(invariants(s.check()), [10, 11, 20].map((lba) => `stale-read@${late}/${lba}`), 'a snapshot begun after all were answered must hold them');

  // A consistency group: A on volume a, then B on volume b; one snapshot op per volume.
  const group = (heldA: boolean, group: string | undefined) => {
    const s = new Script();
    const a = s.write({ lba: 10, at: [1, 2], volume: 'a' });
    const b = s.write({ lba: 20, at: [3, 4], volume: 'b' });
    const seenA: Seen[] = Array(32).fill(0);
    const seenB: Seen[] = Array(32).fill(0);
    if (heldA) seenA[10] = a;
    seenB[20] = b;
    const sa = s.h.begin({ host: -1, peer: 'p1', kind: 'snapshot', lba: 0, blocks: 32, volume: 'a', group }, 0.5);
    const sb = s.h.begin({ host: -1, peer: 'p1', kind: 'snapshot', lba: 0, blocks: 32, volume: 'b', group }, 0.5);
    s.h.end(sa, 'ok', seenA, 5);
    s.h.end(sb, 'ok', seenB, 5);
    return { vs: s.check(), sa: sa.id };
  };
  t.same(group(true, 'g').vs, [], 'a group cut holding A on volume a and B on volume b');
  const torn = group(false, 'g');
  t.same(invariants(torn.vs), [`snapshot-cut@${torn.sa}/10`], 'a group cut holding B on b but not A on a');
  t.match(torn.vs[0].message, /snapshot #\d+ of b .* holds write #2 \(b\) .* but snapshot #\d+ of a .* holds at lba 10 zeros/);
  t.same(group(false, undefined).vs, [], 'two snapshots of their own are two cuts');
});

t.test('unmaps put zeros down: zeros are read right after one, stale after a write that followed it', async (t) => {
  let s = new Script();
  const w1 = s.write({ lba: 5, blocks: 2, at: [0, 1] });
  const u = s.op('unmap', { lba: 5, at: [2, 3] }).id;
  s.read({ lba: 5, blocks: 2, at: [4, 5], seen: [0, w1] });
  t.same(s.check(), [], 'zeros where the unmap was, the write next to it');
  let r = s.read({ lba: 5, blocks: 2, at: [4, 5], seen: [w1, w1] });
  let vs = s.check();
  t.same(invariants(vs), [`stale-read@${r}/5`], 'the write the unmap replaced: stale');
  t.match(vs[0].message, `but unmap #${u} (host 0 via p1, 2–3 ms) was answered`);
  const phantom = s.read({ lba: 5, at: [4, 5], seen: [u] });
  t.same(invariants(s.check()).slice(-1), [`phantom-read@${phantom}/5`], 'a block naming an unmap: it puts zeros, not its id');

  s = new Script();
  s.op('unmap', { lba: 5, at: [0, 1] });
  const w2 = s.write({ lba: 5, at: [2, 3], fua: true });
  r = s.read({ lba: 5, at: [4, 5], seen: [0] });
  vs = s.check();
  t.same(invariants(vs), [`acknowledged-write-lost@${r}/5`], 'zeros after a durable write that followed the unmap: lost');
  t.match(vs[0].message, /saw zeros \(unmap #1 .*\) at lba 5, but write #2/);
  s = new Script();
  s.write({ lba: 5, at: [0, 1], fua: true });
  s.op('unmap', { lba: 5, at: [2, 3], fua: true });
  s.crash(3.5);
  s.read({ lba: 5, at: [4, 5], seen: [0] });
  t.same(s.check(), [], 'zeros of the later durable unmap, though the initial zeros are hidden');
  s = new Script();
  s.op('unmap', { lba: 5, at: [2, 3], outcome: 'error' });
  const w3 = s.write({ lba: 5, at: [0, 1] });
  s.read({ lba: 5, at: [4, 5], seen: [0] });
  t.same(s.check(), [], 'a failed unmap may have landed');
  t.ok(w3 > 0);

  s = new Script();
  const w4 = s.write({ lba: 5, at: [0, 1] });
  s.op('unmap', { lba: 5, at: [2, 3] });
  const bad = s.op('caw', { lba: 5, at: [4, 5], outcome: 'miscompare', seen: [0] }).id;
  s.op('caw', { lba: 5, at: [4, 5], outcome: 'miscompare', seen: [w4] });
  t.same(invariants(s.check()), [`false-miscompare@${bad}/5`], 'a caw against the zeros an unmap put down, the only value then, must not miscompare');

  const cut = (unmapped: boolean) => {
    const s = new Script();
    const a = s.write({ lba: 10, at: [1, 2] });
    if (unmapped) s.op('unmap', { lba: 10, at: [2.2, 2.5] });
    const b = s.write({ lba: 20, at: [3, 4] });
    const seen: Seen[] = Array(32).fill(0);
    seen[20] = b;
    t.ok(a > 0);
    return s.op('snapshot', { lba: 0, at: [0.5, 5], seen }) && invariants(s.check()).map((v) => v.split('@')[0]);
  };
  t.same(cut(true), [], 'a snapshot holding B and zeros where A was unmapped before B began: a cut');
  t.same(cut(false), ['snapshot-cut'], 'the same snapshot with no unmap: not a cut');
});

t.test('copies: the route history, protection and convergence checks (copies.ts)', async (t) => {
  const peers = ['p1', 'p2', 'p3'];
  // p4 joins at 10 ms; pages are placed with one copy, page 5 with two (p1, p2).
  const rules: RouteRules = {
    member: (p, atMs) => peers.includes(p) || (p === 'p4' && atMs >= 10), replicas: 2,
    placed: (_v, page) => (page === 5 ? { owner: 'p1', version: 1, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] } : { owner: peers[page % 3], version: 1 }),
  };
  const put = (page: number, route: Route, atMs = 1): RoutePut => ({ volumeId: 'v', page, route, atMs });
  const good = [
    put(0, { owner: 'p1', version: 2, copies: ['p1', 'p2'], inSync: ['p1'] }),
    put(0, { owner: 'p2', version: 3, copies: ['p2', 'p1'], inSync: ['p2'] }),
    put(1, { owner: 'p3', version: 2 }),
    put(0, { owner: 'p2', version: 4, copies: ['p2', 'p1'] }),
  ];
  t.same(checkRouteHistory(good, rules), [], 'epochs rising per page; owners first and in sync');
  const kinds = (puts: RoutePut[]) => checkRouteHistory(puts, rules).map((f) => f.message.replace(/^.*?\}: /, ''));
  t.same(kinds([...good, put(0, { owner: 'p1', version: 4, copies: ['p1', 'p2'] })]), ['version 4 after version 4 (epochs must strictly increase)'], 'two records of one epoch');
  t.same(kinds([put(2, { owner: 'p1', version: 1 })]), ['version 1 after version 1 (epochs must strictly increase)'], 'a record of the placed epoch');
  t.same(kinds([put(0, { owner: 'p1', version: 2, copies: ['p2', 'p1'] })]), ['the owner p1 is not the first copy']);
  t.same(kinds([put(0, { owner: 'p1', version: 2, copies: ['p1', 'p2'], inSync: ['p2'] })]), ['the owner p1 is not in sync']);
  t.same(kinds([put(0, { owner: 'p1', version: 2, copies: ['p1', 'p1'] })]), ['a peer holds two of the copies']);
  t.same(kinds([put(0, { owner: 'p1', version: 2, copies: ['p1', 'p2'], inSync: ['p1', 'p3'] })]), ['p3 is in sync but not a copy']);
  t.same(kinds([put(0, { owner: 'p1', version: 2, copies: ['p1', 'p9'] })]), ['p9 was not a member of the group then']);
  t.same(kinds([put(0, { owner: 'p1', version: 2, copies: ['p1', 'p4'], inSync: ['p1'] }, 9)]), ['p4 was not a member of the group then'], 'a spare named before it joined');
  t.same(kinds([put(0, { owner: 'p1', version: 2, copies: ['p1', 'p4'], inSync: ['p1'] }, 10)]), [], 'and once it joined');
  t.equal(checkRouteHistory([put(0, { owner: 'p1', version: 3 }), put(0, { owner: 'p2', version: 2 })], rules)[0].invariant, 'route-history', 'an epoch going back');
  // An in-sync copy leaves only once enough others are in sync.
  const evacuated = [put(5, { owner: 'p1', version: 2, copies: ['p1', 'p2', 'p3'], inSync: ['p1', 'p2'] }), put(5, { owner: 'p1', version: 3, copies: ['p1', 'p2', 'p3'] }), put(5, { owner: 'p1', version: 4, copies: ['p1', 'p3'] })];
  t.same(checkRouteHistory(evacuated, rules), [], 'p3 added, in sync, then p2 removed: two in sync throughout');
  const early = checkRouteHistory([put(5, { owner: 'p1', version: 2, copies: ['p1', 'p3'], inSync: ['p1'] })], rules);
  t.same(early.map((f) => f.invariant), ['protection-dropped'], 'p2 (in sync) removed as p3 is added, stale');
  t.match(early[0].message, 'in-sync copy on p2 removed with 1 in sync left (p1), 2 before');
  t.same(checkRouteHistory([put(5, { owner: 'p1', version: 2, copies: ['p1', 'p2'], inSync: ['p1'] }), put(5, { owner: 'p1', version: 3, copies: ['p1', 'p3'], inSync: ['p1'] })], rules), [], 'a copy dropped from the in-sync set stays a copy; a stale copy removed takes nothing');
  t.same(checkRouteHistory([put(0, { owner: 'p2', version: 2 })], rules), [], 'a one-copy page moved: its copy swapped');

  const healthy: Route[] = [{ owner: 'p1', version: 1, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] }, { owner: 'p2', version: 5, copies: ['p2', 'p3'] }];
  t.same(checkProtection('vol', healthy, 2), [], 'every page with its 2 copies in sync');
  t.same(checkProtection('vol', [{ owner: 'p1', version: 1 }], 1), [], 'one copy asked, one held');
  const degraded = checkProtection('vol', [...healthy, { owner: 'p3', version: 4, copies: ['p3', 'p1'], inSync: ['p3'] }, { owner: 'p1', version: 3 }], 2);
  t.same(degraded.map((f) => f.invariant), ['under-replicated', 'under-replicated']);
  t.match(degraded[0].message, 'page 2 of vol: only p3 of its copies p3, p1 in sync (v4)');
  t.match(degraded[1].message, 'page 3 of vol has 1 copies (p1; v3), 2 asked');

  const blocks = (...ids: number[]) => Buffer.concat(ids.map((id, i) => (id === 0 ? Buffer.alloc(bs) : encodeBlock(id, 100 + i, bs))));
  const held = (m: Record<string, Buffer | string>): CopiesHeld => ({ page: 0, lba: 100, blocks: 3, held: new Map(Object.entries(m)) });
  t.same(checkConvergence(held({ p1: blocks(7, 0, 9), p2: blocks(7, 0, 9), p3: blocks(7, 0, 9) }), bs), [], 'three equal copies');
  const diverged = checkConvergence(held({ p1: blocks(7, 0, 9), p2: blocks(7, 8, 9), p3: blocks(7, 0, 0) }), bs);
  t.same(diverged.map((f) => f.invariant), ['copies-diverge', 'copies-diverge'], 'each copy unlike the first');
  t.match(diverged[0].message, 'in-sync copies p1 and p2 differ on 1 of blocks 100+3; first at lba 101: p1 holds zeros, p2 holds write #8');
  t.match(diverged[1].message, 'first at lba 102: p1 holds write #9, p3 holds zeros');
  const torn = blocks(7, 0, 9);
  torn[bs * 2 + 3] ^= 1;
  t.match(checkConvergence(held({ p1: blocks(7, 0, 9), p2: torn }), bs)[0]?.message ?? '', 'p2 holds garbage', 'one bit off');
  t.match(checkConvergence(held({ p1: blocks(7, 0, 9), p2: 'no answer within 8000 ms' }), bs)[0]?.message ?? '', "p2's copy could not be read (no answer within 8000 ms)");
});

// The property. A disk with a volatile cache over a durable copy: writes land in the cache
// (FUA ones in both), a flush copies the cache down, a crash throws the cache away and fails
// the commands in flight (their answers are lost with the peer). Each command takes effect at
// random instants of the ManualEnv (a write in two parts, as the router splits one at a page
// boundary), so commands of different hosts interleave from the seed.
type Bug = 'drops-writes' | 'reads-previous' | 'ignores-fua-and-flush' | 'misplaces-writes' | 'snapshot-not-atomic' | 'caw-miscompares';

class SimDisk implements BlockBackend {
  readonly blockBytes = bs;
  readonly grainBlocks = 8;
  private cache = new Map<number, Buffer>();
  private durable = new Map<number, Buffer>();
  private previous = new Map<number, Buffer>();
  private epoch = 0;

  constructor(
    readonly blockCount: number,
    private readonly env: ManualEnv,
    private readonly bug?: Bug,
  ) {}

  async read(lba: number, blocks: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    for (const [at, n] of this.halves(lba, blocks)) parts.push(await this.step(() => this.get(at, n)));
    await this.step(() => undefined);
    return Buffer.concat(parts);
  }

  async write(lba: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    const dropped = this.bug === 'drops-writes' && this.env.random.int(50) === 0;
    const shift = this.bug === 'misplaces-writes' && this.env.random.int(50) === 0 && lba + data.length / bs < this.blockCount ? 1 : 0;
    for (const [at, n] of this.halves(lba, data.length / bs)) {
      await this.step(() => dropped || this.put(at + shift, data.subarray((at - lba) * bs, (at - lba + n) * bs), opts.fua === true));
    }
    await this.step(() => undefined);
  }

  async compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts: { fua?: boolean } = {}): Promise<CompareAndWriteResult> {
    const r = await this.step((): CompareAndWriteResult => {
      const current = this.get(lba, compare.length / bs, true);
      if (!current.equals(compare) || (this.bug === 'caw-miscompares' && this.env.random.int(5) === 0)) return { ok: false, miscompareOffsetBytes: 0 };
      this.put(lba, data, opts.fua === true);
      return { ok: true };
    });
    await this.step(() => undefined);
    return r;
  }

  async flush(): Promise<void> {
    await this.step(() => undefined);
    await this.step(() => this.bug === 'ignores-fua-and-flush' || (this.durable = new Map(this.cache)));
    await this.step(() => undefined);
  }

  /** The whole volume as of one instant (a bug: block by block over time). */
  async snapshot(): Promise<Buffer> {
    if (this.bug !== 'snapshot-not-atomic') return this.step(() => this.get(0, this.blockCount, true));
    const parts: Buffer[] = [];
    for (let lba = 0; lba < this.blockCount; lba += 32) parts.push(await this.step(() => this.get(lba, 32, true)));
    return Buffer.concat(parts);
  }

  crash(): void {
    this.epoch++;
    this.cache = new Map(this.durable);
  }

  async unmap(): Promise<void> {
    throw new Error('not in the workload');
  }

  async lbaStatus(): Promise<LbaExtent[]> {
    throw new Error('not in the workload');
  }

  /** Wait 0–3 ms, then do `effect` unless a crash came first (the command then fails). */
  private async step<T>(effect: () => T): Promise<T> {
    const epoch = this.epoch;
    await sleep(this.env.timers, this.env.random.int(4));
    if (this.epoch !== epoch) throw new Error('the disk crashed under the command');
    return effect();
  }

  private halves(lba: number, blocks: number): [number, number][] {
    const cut = 1 + this.env.random.int(blocks);
    return cut === blocks ? [[lba, blocks]] : [[lba, cut], [lba + cut, blocks - cut]];
  }

  private get(lba: number, blocks: number, exact = false): Buffer {
    const stale = !exact && this.bug === 'reads-previous' && this.env.random.int(10) === 0;
    const out = Buffer.alloc(blocks * bs);
    for (let i = 0; i < blocks; i++) (stale ? this.previous : this.cache).get(lba + i)?.copy(out, i * bs);
    return out;
  }

  private put(lba: number, data: Buffer, fua: boolean): void {
    for (let i = 0; i < data.length / bs; i++) {
      const block = Buffer.from(data.subarray(i * bs, (i + 1) * bs));
      const before = this.cache.get(lba + i);
      if (before) this.previous.set(lba + i, before);
      this.cache.set(lba + i, block);
      if (fua && this.bug !== 'ignores-fua-and-flush') this.durable.set(lba + i, block);
    }
  }
}

const geometry: Geometry = { blockCount: 256, pageBlocks: 64, blockBytes: bs };

/** One run: 4 hosts, 50 commands each, and an admin taking snapshots and crashing the disk. */
async function simulate(seed: number, bug?: Bug): Promise<{ history: History; violations: Violation[] }> {
  const env = new ManualEnv({ seed });
  const disk = new SimDisk(geometry.blockCount, env, bug);
  const history = new History(() => env.clock.monotonicMs());
  const workload = new Workload(new SeededRandom(seed + 0x5eed), geometry);
  let running = 4;
  const hosts = [0, 1, 2, 3].map(async (host) => {
    for (let i = 0; i < 50; i++) await workload.perform(workload.next(host), disk, history, 'm');
    running--;
  });
  const admin = (async () => {
    for (let n = 0; running > 0; n++) {
      await sleep(env.timers, 20 + env.random.int(40));
      if (env.random.int(4) === 0) {
        disk.crash();
        history.crash('m');
        continue;
      }
      let image: Buffer | undefined;
      const volumes = [{ blocks: geometry.blockCount }];
      await recordSnapshot(history, { peer: 'm', name: `s${n}`, blockBytes: bs, volumes }, async () => void (image = await disk.snapshot()), async () => image!);
    }
  })();
  while (running > 0 || env.timers.pending() > 0) await fireMillisecond(env);
  await Promise.all([...hosts, admin]);
  return { history, violations: check(history) };
}

/**
 * Fire every timer due at the next due time, then let continuations run (one turn of the real
 * event loop): as ManualEnv.run, but one turn per simulated millisecond rather than per timer.
 */
async function fireMillisecond(env: ManualEnv): Promise<void> {
  if (!env.timers.fireNext(Infinity)) throw new Error('the simulation is stuck: no timer armed');
  while (env.timers.fireNext(env.clock.monotonicMs()));
  await new Promise((resolve) => setImmediate(resolve));
}

t.test('a correct disk under the workload: no violation over 200 seeds, with crashes, caws both ways and snapshots', async (t) => {
  const started = Date.now();
  const totals = { ops: 0, crashes: 0, miscompares: 0, cawsOk: 0, errors: 0, snapshots: 0, crossingPages: 0, seenWritten: 0 };
  for (let seed = 1; seed <= 200; seed++) {
    const { history, violations } = await simulate(seed);
    if (violations.length > 0) {
      t.fail(`seed ${seed}: ${violations.length} violations, e.g. ${violations[0].invariant}: ${violations[0].message}\n${traceOf(history, violations[0]).join('\n')}`);
      return;
    }
    totals.ops += history.ops.length;
    totals.crashes += history.crashes.length;
    for (const op of history.ops) {
      if (op.kind === 'caw') op.outcome === 'ok' ? totals.cawsOk++ : op.outcome === 'miscompare' && totals.miscompares++;
      if (op.outcome === 'error') totals.errors++;
      if (op.kind === 'snapshot' && op.outcome === 'ok') totals.snapshots++;
      if (op.kind !== 'flush' && Math.floor(op.lba / geometry.pageBlocks) !== Math.floor((op.lba + op.blocks - 1) / geometry.pageBlocks)) totals.crossingPages++;
      if (op.kind === 'read') totals.seenWritten += op.seen?.filter((s) => typeof s === 'number' && s > 0).length ?? 0;
    }
  }
  t.pass(`200 seeds in ${Date.now() - started} ms: ${JSON.stringify(totals)}`);
  t.ok(totals.crashes > 100 && totals.errors > 100, 'crashes happened and failed commands in flight');
  t.ok(totals.cawsOk > 100 && totals.miscompares > 100, 'caws both succeeded and miscompared');
  t.ok(totals.snapshots > 300 && totals.crossingPages > 1000 && totals.seenWritten > 10000, 'snapshots were taken, commands crossed pages, reads saw written data');
});

t.test('disks with a known bug are caught, each by the invariant it breaks', async (t) => {
  // A dropped write shows only if a read comes before the block is written again: fewer seeds.
  const expect: [Bug, string[], number][] = [
    ['drops-writes', ['stale-read', 'acknowledged-write-lost'], 5],
    ['reads-previous', ['stale-read', 'acknowledged-write-lost'], 15],
    ['ignores-fua-and-flush', ['acknowledged-write-lost'], 10],
    ['misplaces-writes', ['garbage'], 10],
    ['snapshot-not-atomic', ['snapshot-cut'], 8],
    ['caw-miscompares', ['false-miscompare'], 10],
  ];
  for (const [bug, names, seedsMin] of expect) {
    let caught = 0;
    let example = '';
    for (let seed = 1; seed <= 20; seed++) {
      const found = (await simulate(seed, bug)).violations.filter((v) => names.includes(v.invariant));
      if (found.length > 0) caught++;
      example ||= found[0] ? `${found[0].invariant}: ${found[0].message}` : '';
    }
    t.ok(caught >= seedsMin, `${bug}: caught in ${caught} of 20 seeds (at least ${seedsMin}), e.g. ${example}`);
  }
});

t.test('the workload: hot regions straddle page boundaries, commands in the stated mix, recorded as they ran', async (t) => {
  const wl = new Workload(new SeededRandom(7), { blockCount: 8 * 1024, pageBlocks: 1024, blockBytes: bs });
  t.equal(wl.regions.length, 8);
  t.ok(wl.regions.filter((r) => Math.floor(r.lba / 1024) !== Math.floor((r.lba + r.blocks - 1) / 1024)).length === 7, 'the 7 page boundaries, each inside a hot region');
  const counts: Record<string, number> = {};
  let fua = 0;
  let outside = 0;
  for (let i = 0; i < 10_000; i++) {
    const op = wl.next(0);
    counts[op.kind] = (counts[op.kind] ?? 0) + 1;
    if (op.fua) fua++;
    if (op.kind !== 'flush' && !(op.lba >= 0 && op.blocks >= 1 && op.lba + op.blocks <= 8 * 1024 && op.blocks <= (op.kind === 'caw' ? 4 : 16))) outside++;
  }
  t.equal(outside, 0, 'every command inside the volume, 1..16 blocks (caw 1..4)');
  t.ok(counts.write > 4000 && counts.read > 3000 && counts.caw > 700 && counts.flush > 700, `mix ${JSON.stringify(counts)}`);
  t.ok(fua > 1000 && fua < 2000, `fua ${fua} of ${counts.write + counts.caw} writes and caws`);

  const history = new History(() => 0);
  const mem = new MemoryBackend(bs, 64, 8);
  const one = new Workload(new SeededRandom(1), { blockCount: 64, pageBlocks: 32, blockBytes: bs });
  const w = await one.perform({ host: 0, kind: 'write', lba: 30, blocks: 4, fua: true }, mem, history, 'p1');
  t.same([w.kind, w.outcome, w.fua, w.peer], ['write', 'ok', true, 'p1']);
  t.same(decodeBlocks(await mem.read(30, 4), 30, bs, 4), [w.id, w.id, w.id, w.id], 'the write put its id down');
  const r = await one.perform({ host: 1, kind: 'read', lba: 29, blocks: 3, fua: false }, mem, history, 'p2');
  t.same(r.seen, [0, w.id, w.id]);
  const c1 = await one.perform({ host: 1, kind: 'caw', lba: 30, blocks: 2, fua: false }, mem, history, 'p2');
  t.same([c1.outcome, c1.seen], ['ok', [w.id, w.id]], 'host 1 read the blocks, so its caw compares right');
  const c2 = await one.perform({ host: 0, kind: 'caw', lba: 30, blocks: 2, fua: false }, mem, history, 'p1');
  t.same([c2.outcome, c2.seen], ['miscompare', [w.id, w.id]], 'host 0 still believes its own write is there: miscompare');
  const c3 = await one.perform({ host: 0, kind: 'caw', lba: 30, blocks: 2, fua: false }, mem, history, 'p1');
  t.same([c3.outcome, c3.seen], ['miscompare', [0, 0]], 'after a miscompare it knows nothing, so compares against zeros: miscompare again');
  await one.perform({ host: 0, kind: 'read', lba: 30, blocks: 2, fua: false }, mem, history, 'p1');
  const c4 = await one.perform({ host: 0, kind: 'caw', lba: 30, blocks: 2, fua: false }, mem, history, 'p1');
  t.same([c4.outcome, c4.seen], ['ok', [c1.id, c1.id]], 'having read them, it compares right');
  t.same(decodeBlocks(await mem.read(30, 2), 30, bs, 2), [c4.id, c4.id]);
  t.same(check(history), [], 'the history checks');

  const broken = Object.assign(Object.create(mem) as BlockBackend, { write: async () => Promise.reject(new Error('link down')) });
  const e = await one.perform({ host: 0, kind: 'write', lba: 0, blocks: 1, fua: false }, broken, history, 'p1');
  t.same([e.outcome, typeof e.endMs, e.error], ['error', 'number', 'Error: link down'], 'an exception is outcome error, what was thrown kept for the trace');
});
