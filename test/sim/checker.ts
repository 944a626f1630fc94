// The simulator's judge (issue 16): given the History of a run, what went wrong. Pure: plain
// data in, violations out.
//
// Every block is a register. A write (or an ok COMPARE AND WRITE) takes effect at some
// instant between its start and its answer; one that failed or never ended may take effect at
// any later time ("in flight forever"). A crash of any peer after a write started may lose it
// unless it was durable before that crash: a
// write is durable from its answer when FUA, else from the answer of the first ok flush of its
// volume that started after the write was answered. A read may return any write that started
// before the read ended and that is not hidden at the read: hidden by a write that began after
// it was answered and that stands (see `stands`: answered before the read began and not
// possibly lost before the read was answered). The initial zeros are a write answered and
// durable at -infinity, and an unmap writes zeros: so a block read as zeros may hold the initial
// zeros or any unmap of it, and the read is right if one of them may be what it saw (the same for
// what a COMPARE AND WRITE compared and a snapshot holds). A COMPARE AND WRITE reads what it compared: when it succeeded, that
// must be a value a read could return; when it miscompared, some block must have had another
// value it could return. A snapshot is a read over its command, and a consistent cut.
//
// Times: the checker orders events by (ms, the History's event counter) and works on the
// ranks of that order, so events in the same simulated millisecond keep their real order.

import type { Crash, Op, Seen } from './history';

export type Invariant = 'acknowledged-write-lost' | 'stale-read' | 'phantom-read' | 'garbage' | 'snapshot-cut' | 'false-miscompare';

export interface Violation {
  invariant: Invariant;
  /** The read, caw or snapshot whose answer is wrong. */
  opId: number;
  lba?: number;
  /** What was expected and what was seen, with op ids and times. */
  message: string;
}

/** A write as the checker sees it; ranks in the run's event order. */
interface Write {
  op: Op | undefined; // undefined: the initial zeros
  startRank: number;
  /** Rank of its ok answer; Infinity if it failed or never ended (it may land any time). */
  endRank: number;
  /** Rank from which it cannot be lost; Infinity if never. */
  durableRank: number;
  /** Rank of the crash that may have lost it; Infinity if none did (or it was durable first). */
  lostRank: number;
}

const zeros: Write = { op: undefined, startRank: -Infinity, endRank: -Infinity, durableRank: -Infinity, lostRank: Infinity };

/** The run's writes, indexed for the checks (ids are unique across volumes). */
interface Index {
  writesById: Map<number, Write>;
  /** Every op by id (what a block naming no write names). */
  opsById: Map<number, Op>;
  /** blockKey(volume, lba) → the writes that cover that block. */
  writesByBlock: Map<string, Write[]>;
}

function blockKey(volume: string | undefined, lba: number): string {
  return `${volume ?? ''}\0${lba}`;
}

export function check(history: { ops: readonly Op[]; crashes: readonly Crash[] }): Violation[] {
  const rank = ranker(history.ops, history.crashes);
  const crashRanks = history.crashes.map((c) => rank(c.atMs, c.seq)).sort((a, b) => a - b);
  const index = indexWrites(history.ops, rank, crashRanks);
  const out: Violation[] = [];
  for (const op of history.ops) {
    if (answered(op)) checkReads(op, spanOf(op, rank), index, out);
    if (miscompared(op)) checkMiscompare(op, spanOf(op, rank), index, out);
  }
  const snapshots = history.ops.filter((op): op is Judged => answered(op) && op.kind === 'snapshot');
  for (const cut of groupBy(snapshots, (op) => op.group ?? `#${op.id}`).values()) checkCut(cut, rank, index, out);
  return out;
}

type Judged = Op & { seen: Seen[]; endMs: number; endSeq: number };

/** Ops whose `seen` states what the blocks held at some instant of the op: ok reads, snapshots and caws (the compared blocks). */
function answered(op: Op): op is Judged {
  return op.outcome === 'ok' && op.seen !== undefined && op.endSeq !== undefined && (op.kind === 'read' || op.kind === 'snapshot' || op.kind === 'caw');
}

function miscompared(op: Op): op is Judged {
  return op.kind === 'caw' && op.outcome === 'miscompare' && op.seen !== undefined && op.endSeq !== undefined;
}

/** The ranks between which a read took its value. */
interface Span {
  start: number;
  end: number;
}

function spanOf(op: Judged, rank: (ms: number, seq: number) => number): Span {
  return { start: rank(op.startMs, op.startSeq), end: rank(op.endMs, op.endSeq) };
}

/** Maps (ms, seq) of any recorded event to its place in the run's order. */
function ranker(ops: readonly Op[], crashes: readonly Crash[]): (ms: number, seq: number) => number {
  const events: [number, number][] = crashes.map((c) => [c.atMs, c.seq]);
  for (const op of ops) {
    events.push([op.startMs, op.startSeq]);
    if (op.endMs !== undefined && op.endSeq !== undefined) events.push([op.endMs, op.endSeq]);
  }
  events.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const bySeq = new Map<number, number>();
  events.forEach(([, seq], i) => bySeq.set(seq, i));
  return (ms, seq) => {
    const r = bySeq.get(seq);
    if (r === undefined || events[r][0] !== ms) throw new Error(`no event ${seq} at ${ms} ms in the history`);
    return r;
  };
}

function indexWrites(ops: readonly Op[], rank: (ms: number, seq: number) => number, crashRanks: number[]): Index {
  const durableAfter = flushes(ops, rank);
  const index: Index = { writesById: new Map(), opsById: new Map(ops.map((op) => [op.id, op])), writesByBlock: new Map() };
  for (const op of ops) {
    if (!writes(op)) continue;
    const ok = op.outcome === 'ok' && op.endMs !== undefined && op.endSeq !== undefined;
    const endRank = ok ? rank(op.endMs!, op.endSeq!) : Infinity;
    const durableRank = !ok ? Infinity : op.fua ? endRank : durableAfter(op.volume, endRank);
    // A crash while the write was in flight may lose it too: it may have landed on a peer that
    // died before the answer reached the host (the simulator found this case, seed 72).
    const startRank = rank(op.startMs, op.startSeq);
    const crashRank = firstAfter(crashRanks, startRank);
    const w: Write = { op, startRank, endRank, durableRank, lostRank: durableRank < crashRank ? Infinity : crashRank };
    index.writesById.set(op.id, w);
    for (let lba = op.lba; lba < op.lba + op.blocks; lba++) pushTo(index.writesByBlock, blockKey(op.volume, lba), w);
  }
  return index;
}

/** Whether the op may have put its blocks down: writes, unmaps and caws that did not miscompare. */
function writes(op: Op): boolean {
  return (op.kind === 'write' || op.kind === 'caw' || op.kind === 'unmap') && op.outcome !== 'miscompare';
}

/** The writes that may have put value `seen` at `lba`: the write it names, or for zeros the initial zeros and every unmap of the block. */
function writersOf(seen: number, volume: string | undefined, lba: number, index: Index): (Write | undefined)[] {
  if (seen !== 0) return [index.writesById.get(seen)];
  return [zeros, ...(index.writesByBlock.get(blockKey(volume, lba)) ?? []).filter((w) => w.op!.kind === 'unmap')];
}

/**
 * For a write to `volume` answered at rank r: the rank from which it is durable by a flush
 * (the earliest answer of an ok flush of that volume started after r), or Infinity.
 */
function flushes(ops: readonly Op[], rank: (ms: number, seq: number) => number): (volume: string | undefined, r: number) => number {
  const ok = ops.filter((op) => op.kind === 'flush' && op.outcome === 'ok' && op.endMs !== undefined && op.endSeq !== undefined);
  const byVolume = new Map<string, { starts: number[]; endMin: number[] }>();
  for (const [volume, list] of groupBy(ok, (op) => op.volume ?? '')) {
    const sorted = list.map((op) => ({ start: rank(op.startMs, op.startSeq), end: rank(op.endMs!, op.endSeq!) })).sort((a, b) => a.start - b.start);
    const endMin = sorted.map((f) => f.end);
    for (let i = endMin.length - 2; i >= 0; i--) endMin[i] = Math.min(endMin[i], endMin[i + 1]);
    byVolume.set(volume, { starts: sorted.map((f) => f.start), endMin });
  }
  return (volume, r) => {
    const f = byVolume.get(volume ?? '');
    const i = f ? indexAfter(f.starts, r) : 0;
    return f && i < f.endMin.length ? f.endMin[i] : Infinity;
  };
}

/** The first element of sorted `a` greater than `r`, or Infinity. */
function firstAfter(a: number[], r: number): number {
  const i = indexAfter(a, r);
  return i < a.length ? a[i] : Infinity;
}

/** Index of the first element of sorted `a` greater than `r` (a.length if none). */
function indexAfter(a: number[], r: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (a[mid] <= r) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * Whether `w2` stands for a read: answered before the read began, and it cannot have been
 * lost before the read was served (no crash before the read's answer, or w2 was durable
 * before the first one). A crash during the read excuses: the read may have been served
 * (retried) after it. A write w2 that stands hides every write answered before w2 began.
 */
function stands(w2: Write, read: Span): boolean {
  return w2.endRank < read.start && read.end < w2.lostRank;
}

function checkReads(op: Judged, read: Span, index: Index, out: Violation[]): void {
  op.seen.forEach((seen, i) => {
    const lba = op.lba + i;
    if (seen === 'garbage') {
      out.push({ invariant: 'garbage', opId: op.id, lba, message: `${describe(op)} saw at lba ${lba} a block that is neither zeros nor one write's pattern for this lba (torn, misplaced or corrupt)` });
      return;
    }
    // Right if any write that may have put the value there may be what the read saw; else say why not for the latest of them.
    const verdicts = writersOf(seen, op.volume, lba, index).map((writer) => readVerdict(op, read, index, lba, seen, writer));
    if (verdicts.some((v) => v === undefined)) return;
    out.push(verdicts.filter((v) => v!.invariant !== 'phantom-read').pop() ?? verdicts[0]!);
  });
}

/** Why the read `op` cannot have seen `writer`'s value `seen` at `lba` (undefined: it can). */
function readVerdict(op: Judged, read: Span, index: Index, lba: number, seen: number, writer: Write | undefined): Violation | undefined {
  const phantom = whyPhantom(writer, seen, op.volume, lba, read.end);
  if (phantom) return { invariant: 'phantom-read', opId: op.id, lba, message: `${describe(op)} saw write #${seen} at lba ${lba}, but ${miscompareOf(index.opsById.get(seen)) ?? phantom}` };
  const newer = (index.writesByBlock.get(blockKey(op.volume, lba)) ?? []).filter((w2) => w2.startRank > writer!.endRank && stands(w2, read));
  if (newer.length === 0) return undefined;
  const durable = newer.find((w2) => w2.durableRank < read.start);
  const by = durable ?? newer[newer.length - 1];
  const what = writer!.op === undefined ? 'zeros' : writer!.op.kind === 'unmap' ? `zeros (${describe(writer!.op)})` : describe(writer!.op);
  return {
    invariant: durable ? 'acknowledged-write-lost' : 'stale-read',
    opId: op.id,
    lba,
    message: `${describe(op)} saw ${what} at lba ${lba}, but ${describe(by.op!)} was answered after that and before the read began${durable ? ' and was durable by then' : ' (not durable when the read began)'}`,
  };
}

/**
 * A caw that miscompared must have found, on some block, a value other than the one it
 * compared against: wrong if on every block the compared value was the only one a read could
 * have returned (every other write to the block, and the zeros, is hidden or began after
 * the caw was answered).
 */
function checkMiscompare(op: Judged, read: Span, index: Index, out: Violation[]): void {
  const only = op.seen.every((seen, i) => {
    const lba = op.lba + i;
    if (seen === 'garbage') return false;
    const same = writersOf(seen, op.volume, lba, index).filter((w) => w !== undefined && whyPhantom(w, seen, op.volume, lba, read.end) === undefined);
    if (same.length === 0) return false;
    const writes = index.writesByBlock.get(blockKey(op.volume, lba)) ?? [];
    const newest = writes.reduce((r, w2) => (stands(w2, read) ? Math.max(r, w2.startRank) : r), -Infinity);
    const hidden = (w: Write) => w.endRank < newest;
    // (If the compared value is hidden, the newest write that stands is not: no need to ask.)
    return [zeros, ...writes].every((w) => same.includes(w) || w.startRank > read.end || hidden(w));
  });
  if (!only) return;
  out.push({ invariant: 'false-miscompare', opId: op.id, lba: op.lba, message: `${describe(op)} compared against ${op.seen.map((s) => `#${s}`).join(', ')}, the only values its blocks could hold then` });
}

/** What to say of a block written by a caw that answered MISCOMPARE (undefined: `op` is no such caw). */
function miscompareOf(op: Op | undefined): string | undefined {
  if (op?.kind !== 'caw' || op.outcome !== 'miscompare') return undefined;
  return `${describe(op)} answered MISCOMPARE, so it must have written nothing (a COMPARE AND WRITE sent again after its first attempt was applied?)`;
}

/** Why a read of `volume` ending at `readEnd` cannot have seen `writer` at `lba` (undefined: it can). */
function whyPhantom(writer: Write | undefined, seen: number, volume: string | undefined, lba: number, readEnd: number): string | undefined {
  if (writer === undefined) return `no write or ok caw #${seen} exists`;
  if (writer.op === undefined) return undefined;
  if (writer.op.kind === 'unmap' && seen !== 0) return `${describe(writer.op)} puts zeros down, not its id`;
  if ((writer.op.volume ?? '') !== (volume ?? '')) return `${describe(writer.op)} wrote volume ${writer.op.volume ?? '(none)'}`;
  if (lba < writer.op.lba || lba >= writer.op.lba + writer.op.blocks) return `${describe(writer.op)} did not write that lba`;
  if (writer.startRank > readEnd) return `${describe(writer.op)} began after the read was answered`;
  return undefined;
}

/**
 * A snapshot must be a consistent cut: if it holds write B, and write A was answered before B
 * began, then on every block A wrote it holds A or a write not answered before A began. A write
 * a crash may have lost before the snapshot ended is not required. The snapshots of a
 * consistency group (one op per volume, the same `group`) are one cut.
 */
function checkCut(snaps: Judged[], rank: (ms: number, seq: number) => number, index: Index, out: Violation[]): void {
  const snapEnd = Math.max(...snaps.map((s) => rank(s.endMs, s.endSeq)));
  const byVolume = new Map(snaps.map((s) => [s.volume ?? '', s]));
  // Zeros may be the initial ones or any unmap of the block: the one answered last is held (the
  // most lenient choice), and a zero block never counts as the latest write held.
  const held = (snap: Judged, lba: number): Write | undefined => {
    const seen = snap.seen[lba - snap.lba];
    if (seen === undefined || seen === 'garbage') return undefined;
    const possible = writersOf(seen, snap.volume, lba, index).filter((w): w is Write => w !== undefined && whyPhantom(w, seen, snap.volume, lba, snapEnd) === undefined);
    return possible.reduce<Write | undefined>((best, w) => (!best || w.endRank > best.endRank ? w : best), undefined);
  };
  let latest: { w: Write; snap: Judged; lba: number } | undefined;
  for (const snap of snaps) {
    snap.seen.forEach((seen, i) => {
      const w = seen === 0 ? undefined : held(snap, snap.lba + i);
      if (w && w.op && (!latest || w.startRank > latest.w.startRank)) latest = { w, snap, lba: snap.lba + i };
    });
  }
  if (!latest) return;
  for (const a of index.writesById.values()) {
    const snap = byVolume.get(a.op!.volume ?? '');
    if (!snap || !(a.endRank < latest.w.startRank && snapEnd < a.lostRank)) continue;
    for (let lba = Math.max(a.op!.lba, snap.lba); lba < Math.min(a.op!.lba + a.op!.blocks, snap.lba + snap.blocks); lba++) {
      const h = held(snap, lba);
      if (h === undefined || h === a || h.endRank >= a.startRank) continue;
      out.push({
        invariant: 'snapshot-cut',
        opId: snap.id,
        lba,
        message: `${describe(latest.snap)} holds ${describe(latest.w.op!)} at lba ${latest.lba}, which began after ${describe(a.op!)} was answered, but ${describe(snap)} holds at lba ${lba} ${h.op ? describe(h.op) : 'zeros'}, answered before ${describe(a.op!)} began`,
      });
      break;
    }
  }
}

function describe(op: Op): string {
  const name = op.kind === 'snapshot' ? `snapshot${op.snapshot ? ` ${op.snapshot}` : ''} #${op.id}${op.volume === undefined ? '' : ` of ${op.volume}`}` : `${op.kind} #${op.id}${op.volume === undefined ? '' : ` (${op.volume})`}`;
  const who = op.host >= 0 ? `host ${op.host} via ${op.peer}` : `via ${op.peer}`;
  const flags = [op.fua ? 'fua' : '', op.outcome && op.outcome !== 'ok' ? op.outcome : ''].filter((s) => s).join(', ');
  return `${name} (${who}, ${op.startMs}–${op.endMs ?? 'never'} ms${flags ? `, ${flags}` : ''})`;
}

function groupBy<T, K>(items: readonly T[], key: (item: T) => K): Map<K, T[]> {
  const m = new Map<K, T[]>();
  for (const item of items) pushTo(m, key(item), item);
  return m;
}

function pushTo<K, T>(m: Map<K, T[]>, key: K, item: T): void {
  const list = m.get(key);
  if (list) list.push(item);
  else m.set(key, [item]);
}

/**
 * What a person reads for one violation: the ops that touched its block (and flushes of its
 * volume, and crashes) that began before the violating op ended, in the order they began, the
 * last `linesMax` of them, each with what it saw there.
 */
export function traceOf(history: { ops: readonly Op[]; crashes: readonly Crash[] }, v: Violation, linesMax = 40): string[] {
  const at = history.ops.find((op) => op.id === v.opId);
  if (!at) return [];
  const lba = v.lba ?? at.lba;
  const endSeq = at.endSeq ?? Infinity;
  const touches = (op: Op) => (op.volume ?? '') === (at.volume ?? '') && (op.kind === 'flush' || (lba >= op.lba && lba < op.lba + op.blocks));
  const lines: [number, string][] = history.ops
    .filter((op) => op.startSeq < endSeq && touches(op))
    .map((op) => [op.startSeq, `${describe(op)}${op.seen ? ` saw ${op.seen[lba - op.lba] ?? '-'}` : ''}${op.id === at.id ? '  <- ' + v.invariant : ''}`]);
  for (const c of history.crashes) if (c.seq < endSeq) lines.push([c.seq, `crash of ${c.peer} at ${c.atMs} ms`]);
  return lines
    .sort((a, b) => a[0] - b[0])
    .slice(-linesMax)
    .map(([, line]) => line);
}
