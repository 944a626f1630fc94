// Frames an iSCSI byte stream into PDUs. Push socket chunks in, pull events out. Pure: no
// socket, no timers. Every length is checked before anything is allocated for it: a data
// segment over the hard maximum is fatal (we cannot trust the stream any more); one over the
// negotiated maximum but under the hard one is answered with a Reject as soon as its header is
// in, and its bytes are then discarded as they arrive (never buffered: what one connection
// holds is bounded by the negotiated maximum, not by what the sender claims).

import { ProtocolError } from '../errors';
import { ahsBytesMax, bhsBytes, dataSegmentBytesMax } from '../limits';
import { crc32c, digestBytes } from './digest';
import { bhsAhsLength, bhsDataSegmentLength, decodePdu, padBytes } from './pdu';
import { RejectReason, type Pdu } from './types';

/** The data segment of every PDU that has none (zero bytes: nothing can be written into it). */
const noData = Buffer.alloc(0);

export type ParseEvent =
  | { kind: 'pdu'; pdu: Pdu; bhs: Buffer }
  /** The PDU was skipped; the connection can go on after a Reject with this reason. */
  | { kind: 'reject'; reason: number; bhs: Buffer }
  /** The stream cannot be trusted: stop reading and drop the connection. */
  | { kind: 'fatal'; error: ProtocolError };

export interface ParserOptions {
  maxRecvDataSegmentBytes: number;
  headerDigest: boolean;
  dataDigest: boolean;
  maxDataSegmentBytesHard?: number;
}

export class PduParser {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private headerDigest: boolean;
  private dataDigest: boolean;
  private maxRecvDataSegmentBytes: number;
  private readonly maxDataSegmentBytesHard: number;
  private failed = false;
  /** Bytes of a rejected data segment still to be discarded. */
  private skipBytes = 0;

  constructor(opts: ParserOptions) {
    this.headerDigest = opts.headerDigest;
    this.dataDigest = opts.dataDigest;
    this.maxRecvDataSegmentBytes = opts.maxRecvDataSegmentBytes;
    this.maxDataSegmentBytesHard = opts.maxDataSegmentBytesHard ?? dataSegmentBytesMax;
  }

  /** Takes effect for the next PDU. */
  setDigests(header: boolean, data: boolean): void {
    this.headerDigest = header;
    this.dataDigest = data;
  }

  setMaxRecvDataSegmentBytes(n: number): void {
    this.maxRecvDataSegmentBytes = n;
  }

  get bufferedBytes(): number {
    return this.buffered;
  }

  /** Part of a PDU has arrived and not the rest (the connection times out stalls on this). */
  get hasPartial(): boolean {
    return this.buffered > 0 || this.skipBytes > 0;
  }

  push(chunk: Buffer): void {
    if (this.failed || chunk.length === 0) return;
    const skipped = Math.min(this.skipBytes, chunk.length);
    this.skipBytes -= skipped;
    if (skipped === chunk.length) return;
    const rest = skipped === 0 ? chunk : chunk.subarray(skipped);
    this.chunks.push(rest);
    this.buffered += rest.length;
  }

  next(): ParseEvent | undefined {
    if (this.failed || this.buffered < bhsBytes) return undefined;
    const bhs = this.peek(bhsBytes);
    const ahsLength = bhsAhsLength(bhs);
    const dataLength = bhsDataSegmentLength(bhs);
    if (ahsLength > ahsBytesMax || dataLength > this.maxDataSegmentBytesHard) {
      return this.fail(new ProtocolError(`data segment of ${dataLength} bytes exceeds the limit`));
    }
    const headerLength = bhsBytes + ahsLength + (this.headerDigest ? digestBytes : 0);
    const dataTotal = dataLength === 0 ? 0 : dataLength + padBytes(dataLength) + (this.dataDigest ? digestBytes : 0);
    const oversize = dataLength > this.maxRecvDataSegmentBytes;
    // An oversize segment is not waited for: its header (digest checked) is enough to reject it.
    if (this.buffered < headerLength + (oversize ? 0 : dataTotal)) return undefined;

    const header = this.take(headerLength);
    const bhsCopy = header.subarray(0, bhsBytes);
    if (this.headerDigest) {
      const expected = header.readUInt32LE(bhsBytes + ahsLength);
      if (crc32c(header.subarray(0, bhsBytes + ahsLength)) !== expected) {
        return this.fail(new ProtocolError('header digest error'));
      }
    }
    if (oversize) {
      this.skip(dataTotal);
      return { kind: 'reject', reason: RejectReason.protocolError, bhs: bhsCopy };
    }
    const dataAll = dataTotal === 0 ? noData : this.take(dataTotal);
    const data = dataAll.subarray(0, dataLength);
    if (this.dataDigest && dataLength > 0) {
      const expected = dataAll.readUInt32LE(dataTotal - digestBytes);
      if (crc32c(dataAll.subarray(0, dataTotal - digestBytes)) !== expected) {
        return { kind: 'reject', reason: RejectReason.dataDigestError, bhs: bhsCopy };
      }
    }
    try {
      const ahs = ahsLength > 0 ? header.subarray(bhsBytes, bhsBytes + ahsLength) : undefined;
      return { kind: 'pdu', pdu: decodePdu(bhsCopy, ahs, data), bhs: bhsCopy };
    } catch (err) {
      if (err instanceof ProtocolError && err.rejectReason !== undefined) {
        return { kind: 'reject', reason: err.rejectReason, bhs: bhsCopy };
      }
      return this.fail(err instanceof ProtocolError ? err : new ProtocolError(String(err)));
    }
  }

  private fail(error: ProtocolError): ParseEvent {
    this.failed = true;
    this.chunks.length = 0;
    this.buffered = 0;
    return { kind: 'fatal', error };
  }

  /** Discard `n` bytes: those buffered now, the rest as push() brings them. */
  private skip(n: number): void {
    let now = Math.min(n, this.buffered);
    this.skipBytes = n - now;
    this.buffered -= now;
    while (now > 0) {
      const c = this.chunks[0];
      const k = Math.min(c.length, now);
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
      now -= k;
    }
  }

  /** The first `n` buffered bytes without consuming them (copies only across a chunk seam). */
  private peek(n: number): Buffer {
    const first = this.chunks[0];
    if (first.length >= n) return first.subarray(0, n);
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    for (const c of this.chunks) {
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (off === n) break;
    }
    return out;
  }

  /** Consume `n` bytes: a view when they sit in one chunk, one copy when they span chunks. */
  private take(n: number): Buffer {
    const first = this.chunks[0];
    this.buffered -= n;
    if (first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0];
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    return out;
  }
}
