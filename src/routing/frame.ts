// The wire format of forwarded block requests between peers (DESIGN.md 2). Frames ride the data
// stream of each peer pair (data-stream.ts); a frame's data always ends it, so the batcher
// (batch.ts) can send large data as it is, behind the header. Pure functions: encode writes
// into a Buffer, decode checks every length against the frame before slicing and returns
// undefined on a malformed frame.
//
// request  = kind(1) op(1) flags(1: fua 1, staging 2, replica 4) 0(1) id(4) volume(8) lba(8) blocks(4) routeVersion(4)
//            compareBytes(4) dataBytes(4) layer(4) stamp(8, f64) seq(8) ackedThrough(8) | data
// layer 0 is the live volume; n > 0 reads snapshot n of the volume (read and lbaStatus only).
// stamp: the write's hybrid-clock stamp (src/snapshot/hlc.ts), 0 for none.
// seq, ackedThrough: a replica change's number on its page and the primary's acknowledged mark
// (src/replication/recent.ts); 0 and 0 for a change that is not numbered (resync, reconcile)
// and for every other frame. Replica frames are writes, unmaps and flushes, never staging, and
// reads (a primary whose own store failed a read asks an in-sync copy: never numbered).
// reply    = kind(1) status(1) ownerBytes(1) 0(1) id(4) version(4) detail(4)
//            payloadBytes(4) 0(4) | owner | payload
// An ok reply to a staging or replica request has the receiver's start token in version
// (PageStore.nextStartToken): its sender sees a restart of the receiver between two of its requests
// (a move's chunks, move-machine.ts; a resync's run, resync.ts).
// A CAW request's data is compare ‖ write (compareBytes says where the write half starts).
// An lbaStatus reply's payload is extents of lba(8) blocks(4) mapped(1).
// A failed reply's detail is the failure's ErrorKind (src/errors.ts) and its payload the
// message (at most peerFailureTextBytesMax bytes), for the log only: the kind decides.
//
// Frames come from other peers, which may be buggy or hostile: decoding checks every field
// that has a fixed meaning here (kind, op, flags, lengths per op, lba, stamp, status); what
// depends on the volume (range, blocks × block size) is checked by the page service.

import { ErrorKind, isErrorKind, RemoteFailureError } from '../errors';
import { peerFailureTextBytesMax, peerFrameBytesMax } from '../limits';
import type { LbaExtent } from '../store/types';

export const BlockOp = { read: 1, write: 2, unmap: 3, compareAndWrite: 4, flush: 5, lbaStatus: 6 } as const;
export type BlockOpCode = (typeof BlockOp)[keyof typeof BlockOp];

export const ReplyStatus = {
  ok: 0,
  /** The receiver does not own the page (any more): owner/version say who does. */
  moved: 1,
  miscompare: 2,
  /** The request failed (refused, or failed in the owner's store or beyond): detail is its ErrorKind, payload a message. */
  failed: 3,
  /** The owner does not know the volume (deleted, or not opened yet). */
  noVolume: 4,
} as const;

export interface BlockRequest {
  id: number;
  op: BlockOpCode;
  fua: boolean;
  volumeId: string;
  lba: number;
  blocks: number;
  routeVersion: number;
  compareBytes: number;
  /**
   * Page migration traffic (src/migration): a move's source copying, dual-writing or
   * forwarding to the destination, which accepts it for a page it is receiving.
   */
  staging?: boolean;
  /**
   * A page's primary sending a change to another copy of the page (src/replication), tagged
   * with the page's epoch in routeVersion: the copy refuses an older epoch (MOVED with the
   * route it knows) and applies the change to its own store, whoever the host asked.
   */
  replica?: boolean;
  /** 0: the live volume; n: the volume's snapshot n (src/snapshot), read-only. */
  layer?: number;
  /** A write's hybrid-clock stamp from the peer the host sent it to (0 or absent: none). */
  stamp?: number;
  /** Replica change: its number on the page, given by the primary (0 or absent: not numbered). */
  seq?: number;
  /** Replica change: every change of the page numbered up to this is acknowledged on all in-sync copies (below seq). */
  ackedThrough?: number;
  /** Borrowed until the frame is encoded. */
  data?: Buffer;
}

export interface BlockReply {
  id: number;
  status: number;
  owner: string;
  /** moved: the route version the receiver knows; ok to a staging or replica request: its start token. */
  version: number;
  /** miscompare: the byte offset of the first difference; moved: the page that moved; failed: the ErrorKind. */
  detail: number;
  payload?: Buffer;
}

const requestKind = 1;
const replyKind = 2;
export const requestHeaderBytes = 68;
export const replyHeaderBytes = 24;
const extentBytes = 13;
const validOps = new Set<number>(Object.values(BlockOp));
const validStatuses = new Set<number>(Object.values(ReplyStatus));
const knownFlags = 1 | 2 | 4;

function writeU64(b: Buffer, value: number, at: number): void {
  b.writeUInt32BE(Math.floor(value / 0x1_0000_0000), at);
  b.writeUInt32BE(value >>> 0, at + 4);
}

function readU64(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 0x1_0000_0000 + b.readUInt32BE(at + 4);
}

/** Volume ids as bytes, so that encoding a request does not parse hex each time (a peer serves few volumes). */
const volumeIds = new Map<string, Buffer>();
const volumeIdsMax = 4096;

function volumeIdBytes(volumeId: string): Buffer {
  let b = volumeIds.get(volumeId);
  if (b) return b;
  b = Buffer.alloc(8);
  b.write(volumeId, 'hex');
  if (volumeIds.size >= volumeIdsMax) volumeIds.clear();
  volumeIds.set(volumeId, b);
  return b;
}

/** The bytes encodeRequestInto writes for `r`. */
export function requestFrameBytes(r: Omit<BlockRequest, 'id'>): number {
  return requestHeaderBytes + (r.data?.length ?? 0);
}

/**
 * Write `r` with request id `id` at `b[at..at + requestFrameBytes(r))`, or only its header when
 * `withData` is false (the batcher, batch.ts, then sends the data as it is, after the header).
 * The id is separate so that the link need not copy the caller's request to give it one
 * (link.ts).
 */
export function encodeRequestInto(r: Omit<BlockRequest, 'id'>, id: number, b: Buffer, at: number, withData = true): void {
  const dataBytes = r.data?.length ?? 0;
  b[at] = requestKind;
  b[at + 1] = r.op;
  b[at + 2] = (r.fua ? 1 : 0) | (r.staging ? 2 : 0) | (r.replica ? 4 : 0);
  b[at + 3] = 0;
  b.writeUInt32BE(id >>> 0, at + 4);
  volumeIdBytes(r.volumeId).copy(b, at + 8);
  writeU64(b, r.lba, at + 16);
  b.writeUInt32BE(r.blocks, at + 24);
  b.writeUInt32BE(r.routeVersion, at + 28);
  b.writeUInt32BE(r.compareBytes, at + 32);
  b.writeUInt32BE(dataBytes, at + 36);
  b.writeUInt32BE(r.layer ?? 0, at + 40);
  b.writeDoubleBE(r.stamp ?? 0, at + 44);
  writeU64(b, r.seq ?? 0, at + 52);
  writeU64(b, r.ackedThrough ?? 0, at + 60);
  if (r.data && withData) r.data.copy(b, at + requestHeaderBytes);
}

export function encodeRequest(r: BlockRequest): Buffer {
  const b = Buffer.allocUnsafe(requestFrameBytes(r));
  encodeRequestInto(r, r.id, b, 0);
  return b;
}

/** Whether an op may carry these data and compare lengths: writes carry data, CAW compare ‖ write halves, the rest nothing. */
function lengthsFit(op: number, dataBytes: number, compareBytes: number): boolean {
  if (op === BlockOp.write) return dataBytes > 0 && compareBytes === 0;
  if (op === BlockOp.compareAndWrite) return compareBytes > 0 && dataBytes === 2 * compareBytes;
  return dataBytes === 0 && compareBytes === 0;
}

/** Ops a page's primary sends another copy (src/replication): changes, flushes, and reads of a range its own store failed. */
const replicaOps = new Set<number>([BlockOp.write, BlockOp.unmap, BlockOp.flush, BlockOp.read]);

/**
 * Whether the replica fields fit the op and flags: numbers only on replica frames, safe
 * integers, the mark below the number; replica frames only for changes, flushes and reads
 * (never numbered), never staging.
 */
function replicaFits(op: number, flags: number, seq: number, ackedThrough: number): boolean {
  if (!Number.isSafeInteger(seq) || !Number.isSafeInteger(ackedThrough)) return false;
  if ((flags & 4) === 0) return seq === 0 && ackedThrough === 0;
  if ((flags & 2) !== 0 || !replicaOps.has(op)) return false;
  if (op === BlockOp.read) return seq === 0 && ackedThrough === 0;
  return seq === 0 ? ackedThrough === 0 : ackedThrough < seq;
}

/** The request in `b`; its data is a view into `b`. */
export function decodeRequest(b: Buffer): BlockRequest | undefined {
  if (b.length < requestHeaderBytes || b.length > peerFrameBytesMax || b[0] !== requestKind || !validOps.has(b[1])) return undefined;
  if ((b[2] & ~knownFlags) !== 0 || b[3] !== 0) return undefined;
  const dataBytes = b.readUInt32BE(36);
  const compareBytes = b.readUInt32BE(32);
  if (requestHeaderBytes + dataBytes !== b.length || !lengthsFit(b[1], dataBytes, compareBytes)) return undefined;
  const lba = readU64(b, 16);
  if (!Number.isSafeInteger(lba)) return undefined;
  const stamp = b.readDoubleBE(44);
  if (!(stamp >= 0 && Number.isSafeInteger(stamp))) return undefined;
  const seq = readU64(b, 52);
  const ackedThrough = readU64(b, 60);
  if (!replicaFits(b[1], b[2], seq, ackedThrough)) return undefined;
  return {
    id: b.readUInt32BE(4),
    op: b[1] as BlockOpCode,
    fua: (b[2] & 1) !== 0,
    staging: (b[2] & 2) !== 0,
    replica: (b[2] & 4) !== 0,
    layer: b.readUInt32BE(40),
    volumeId: b.toString('hex', 8, 16),
    lba,
    blocks: b.readUInt32BE(24),
    routeVersion: b.readUInt32BE(28),
    compareBytes,
    stamp,
    seq,
    ackedThrough,
    data: dataBytes > 0 ? b.subarray(requestHeaderBytes) : undefined,
  };
}

/** The bytes encodeReplyInto writes for `r`. */
export function replyFrameBytes(r: BlockReply): number {
  return replyHeaderBytes + Buffer.byteLength(r.owner, 'utf8') + (r.payload?.length ?? 0);
}

/** Write `r` at `b[at..at + replyFrameBytes(r))`, without its payload when `withPayload` is false (see encodeRequestInto). */
export function encodeReplyInto(r: BlockReply, b: Buffer, at: number, withPayload = true): void {
  const ownerBytes = r.owner.length === 0 ? 0 : b.write(r.owner, at + replyHeaderBytes, 'utf8');
  if (ownerBytes > 255) throw new Error('assertion failed: peer ids are short');
  const payloadBytes = r.payload?.length ?? 0;
  b[at] = replyKind;
  b[at + 1] = r.status;
  b[at + 2] = ownerBytes;
  b[at + 3] = 0;
  b.writeUInt32BE(r.id >>> 0, at + 4);
  b.writeUInt32BE(r.version, at + 8);
  b.writeUInt32BE(r.detail, at + 12);
  b.writeUInt32BE(payloadBytes, at + 16);
  b.writeUInt32BE(0, at + 20);
  if (r.payload && withPayload) r.payload.copy(b, at + replyHeaderBytes + ownerBytes);
}

export function encodeReply(r: BlockReply): Buffer {
  const b = Buffer.allocUnsafe(replyFrameBytes(r));
  encodeReplyInto(r, b, 0);
  return b;
}

export function decodeReply(b: Buffer): BlockReply | undefined {
  if (b.length < replyHeaderBytes || b.length > peerFrameBytesMax || b[0] !== replyKind || !validStatuses.has(b[1])) return undefined;
  const ownerBytes = b[2];
  const payloadBytes = b.readUInt32BE(16);
  if (replyHeaderBytes + ownerBytes + payloadBytes !== b.length) return undefined;
  const payloadAt = replyHeaderBytes + ownerBytes;
  return {
    id: b.readUInt32BE(4),
    status: b[1],
    owner: b.toString('utf8', replyHeaderBytes, payloadAt),
    version: b.readUInt32BE(8),
    detail: b.readUInt32BE(12),
    payload: payloadBytes > 0 ? b.subarray(payloadAt) : undefined,
  };
}

/** The reply fields of a failure of `kind` (status failed; the message cut to its bound). */
export function failure(kind: ErrorKind, message: string): Pick<BlockReply, 'status' | 'detail' | 'payload'> {
  const text = Buffer.from(message, 'utf8');
  return { status: ReplyStatus.failed, detail: kind, payload: text.length > peerFailureTextBytesMax ? text.subarray(0, peerFailureTextBytesMax) : text };
}

/**
 * A non-ok reply as the error to raise on this side, keeping the owner's kind (an unknown
 * kind from a newer or broken peer is `other`). `peer`: who answered.
 */
export function replyError(peer: string, reply: BlockReply): RemoteFailureError {
  const text = reply.payload ? reply.payload.toString('utf8', 0, Math.min(reply.payload.length, peerFailureTextBytesMax)) : '';
  if (reply.status === ReplyStatus.failed) return new RemoteFailureError(peer, isErrorKind(reply.detail) ? reply.detail : ErrorKind.other, text);
  // The owner does not hold the volume (yet): it opens volumes when its catalog watch fires.
  if (reply.status === ReplyStatus.noVolume) return new RemoteFailureError(peer, ErrorKind.busy, 'does not hold volume (not opened yet, or deleted)');
  // ok, moved and miscompare are answers the caller handles; reaching here is the caller's bug.
  return new RemoteFailureError(peer, ErrorKind.other, `unexpected reply status ${reply.status}`);
}

export function encodeExtents(extents: readonly LbaExtent[]): Buffer {
  const b = Buffer.alloc(extents.length * extentBytes);
  extents.forEach((e, i) => {
    writeU64(b, e.lba, i * extentBytes);
    b.writeUInt32BE(e.blocks, i * extentBytes + 8);
    b[i * extentBytes + 12] = e.mapped ? 1 : 0;
  });
  return b;
}

export function decodeExtents(b: Buffer | undefined): LbaExtent[] | undefined {
  if (!b) return [];
  if (b.length % extentBytes !== 0) return undefined;
  const out: LbaExtent[] = [];
  for (let at = 0; at < b.length; at += extentBytes) {
    out.push({ lba: readU64(b, at), blocks: b.readUInt32BE(at + 8), mapped: b[at + 12] === 1 });
  }
  return out;
}
