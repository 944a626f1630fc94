// The simulator's record of what hosts asked and what they were answered (issue 16), plain
// data the checker (checker.ts) judges after the run, and the block contents that make an
// answer checkable: every block a write puts down names that write and the block's own lba.
//
// Order: ops and crashes are stamped with sim monotonic ms AND with the order in which the
// History heard of them (`*Seq`). Simulated time stands still while many things happen, so
// two events often share a millisecond; the order of the calls is the real order in the one
// process (a write whose end was recorded before a read began was acknowledged before the
// read was issued). So record an event when it happens, never afterwards.

/** An unmap puts zeros down: a block a read finds zeros was never written, or unmapped. */
export type OpKind = 'write' | 'read' | 'caw' | 'unmap' | 'flush' | 'snapshot';
export type Outcome = 'ok' | 'error' | 'miscompare';
/** What one block held: the id of the write that put it there, 0 for zeros, or 'garbage'. */
export type Seen = number | 'garbage';

export interface Op {
  /** Unique per run, from 1; a write's (or caw's) id is the writeId its blocks carry. */
  id: number;
  /** The host that issued it (0..N-1); -1 for admin actions (snapshots). */
  host: number;
  /** The peer whose router the host used. */
  peer: string;
  /** Ops of different volumes never meet in the checker; absent: the one volume. */
  volume?: string;
  kind: OpKind;
  lba: number;
  blocks: number;
  fua?: boolean;
  /** Sim monotonic ms when issued, and the History's event counter then (ties in ms). */
  startMs: number;
  startSeq: number;
  /** When answered; undefined: still in flight when the run ended. */
  endMs?: number;
  endSeq?: number;
  outcome?: Outcome;
  /** outcome 'error': what was thrown (name: message), for the trace; a TypeError here is the simulator's bug, not the group's. */
  error?: string;
  /** read / snapshot: per block what it returned; caw: what it compared against. */
  seen?: Seen[];
  /** Snapshot ops: its name (its blocks, lba 0..blocks, are in `seen`). */
  snapshot?: string;
  /** Snapshot ops of one consistency group (one per volume) share this: the checker judges them as one cut. */
  group?: string;
}

export interface Crash {
  peer: string;
  atMs: number;
  seq: number;
}

export type OpStart = Pick<Op, 'host' | 'peer' | 'kind' | 'lba' | 'blocks'> & Partial<Pick<Op, 'volume' | 'fua' | 'snapshot' | 'group'>>;

export class History {
  readonly ops: Op[] = [];
  readonly crashes: Crash[] = [];
  private seq = 0;

  /** `nowMs`: the sim's monotonic clock; each call may instead say when (hand-made histories). */
  constructor(private readonly nowMs: () => number = () => 0) {}

  begin(start: OpStart, atMs = this.nowMs()): Op {
    const op: Op = { ...start, id: this.ops.length + 1, startMs: atMs, startSeq: this.seq++ };
    this.ops.push(op);
    return op;
  }

  end(op: Op, outcome: Outcome, seen?: Seen[], atMs = this.nowMs()): void {
    if (op.endSeq !== undefined) throw new Error(`op ${op.id} ended twice`);
    if (atMs < op.startMs) throw new Error(`op ${op.id} ends at ${atMs} ms, before it began at ${op.startMs} ms`);
    if (seen !== undefined && seen.length !== op.blocks) throw new Error(`op ${op.id}: ${seen.length} blocks seen of ${op.blocks}`);
    op.endMs = atMs;
    op.endSeq = this.seq++;
    op.outcome = outcome;
    if (seen !== undefined) op.seen = seen;
  }

  /** End `op` with outcome 'error', keeping what was thrown. */
  fail(op: Op, error: unknown, atMs = this.nowMs()): void {
    this.end(op, 'error', undefined, atMs);
    op.error = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  }

  /** A peer crashed (or restarted): what it held but had not made durable may be gone. */
  crash(peer: string, atMs = this.nowMs()): void {
    this.crashes.push({ peer, atMs, seq: this.seq++ });
  }
}

// A block written by write `writeId` at `lba` repeats the pair (writeId, lba) through its
// bytes: a torn block (two writes), a block at the wrong lba or a corrupted one decodes as
// 'garbage'. Both numbers are 32-bit, which a sim run stays far below.
const pairBytes = 8;

export function encodeBlock(writeId: number, lba: number, blockBytes: number): Buffer {
  if (!(Number.isInteger(writeId) && writeId > 0 && writeId <= 0xffff_ffff)) throw new RangeError(`writeId ${writeId}`);
  if (!(Number.isInteger(lba) && lba >= 0 && lba <= 0xffff_ffff)) throw new RangeError(`lba ${lba}`);
  if (blockBytes <= 0 || blockBytes % pairBytes !== 0) throw new RangeError(`blockBytes ${blockBytes}`);
  const b = Buffer.allocUnsafe(blockBytes);
  for (let at = 0; at < blockBytes; at += pairBytes) {
    b.writeUInt32BE(writeId, at);
    b.writeUInt32BE(lba, at + 4);
  }
  return b;
}

/** What one block (all of `buf`) holds when read at `lba`. */
export function decodeBlock(buf: Buffer, lba: number): Seen {
  if (buf.length === 0 || buf.length % pairBytes !== 0) return 'garbage';
  const writeId = buf.readUInt32BE(0);
  const carried = buf.readUInt32BE(4);
  if (writeId === 0 && carried === 0) return isZeros(buf) ? 0 : 'garbage';
  if (writeId === 0 || carried !== lba) return 'garbage';
  for (let at = pairBytes; at < buf.length; at += pairBytes) {
    if (buf.readUInt32BE(at) !== writeId || buf.readUInt32BE(at + 4) !== carried) return 'garbage';
  }
  return writeId;
}

/** The blocks `writeId` puts down from `lba`. */
export function encodeBlocks(writeId: number, lba: number, blocks: number, blockBytes: number): Buffer {
  const out = Buffer.allocUnsafe(blocks * blockBytes);
  for (let i = 0; i < blocks; i++) encodeBlock(writeId, lba + i, blockBytes).copy(out, i * blockBytes);
  return out;
}

/** What each of `blocks` blocks of `buf`, read from `lba`, holds ('garbage' for any the buffer is short of). */
export function decodeBlocks(buf: Buffer, lba: number, blockBytes: number, blocks: number): Seen[] {
  const seen: Seen[] = [];
  for (let i = 0; i < blocks; i++) seen.push((i + 1) * blockBytes <= buf.length ? decodeBlock(buf.subarray(i * blockBytes, (i + 1) * blockBytes), lba + i) : 'garbage');
  return seen;
}

function isZeros(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}
