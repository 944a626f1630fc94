// EXTENDED COPY (LID1) parameter lists and RECEIVE COPY RESULTS data (SPC-4 6.4, 6.18).
// Pure: parse() turns a parameter list into CSCD and segment descriptors or a SCSI error
// with the field that is wrong; nothing is allocated for a length before it is checked.
// Supported: identification CSCD descriptors (E4h, matched by designator) and
// block→block segments (02h). The device executes the segments (device.ts).

import {
  xcopyCscdDescriptorsMax,
  xcopyDescriptorListBytesMax,
  xcopyInlineBytesMax,
  xcopySegmentBytesMax,
  xcopySegmentDescriptorsMax,
} from '../limits';
import { Asc, SenseKey, type SenseDetail } from './sense';

export const headerBytes = 16;
const cscdBytes = 32;
const identificationCscd = 0xe4;
const blockToBlockSegment = 0x02;
const blockToBlockSegmentBytes = 28;

export const XcopyAsc = {
  tooManyTargetDescriptors: 0x2606,
  unsupportedTargetDescriptorTypeCode: 0x2607,
  tooManySegmentDescriptors: 0x2608,
  unsupportedSegmentDescriptorTypeCode: 0x2609,
  unreachableCopyTarget: 0x0804,
  copyTargetDeviceNotReachable: 0x0d02,
} as const;

export interface Cscd {
  /** NUL: a null device (nothing can be copied to or from it). */
  nul: boolean;
  /** The designator bytes (an NAA identifier for our volumes). */
  designator: Buffer;
  /** DISK BLOCK LENGTH from the device type specific parameters (0: not given). */
  blockBytes: number;
}

export interface Segment {
  sourceIndex: number;
  destinationIndex: number;
  blocks: number;
  sourceLba: number;
  destinationLba: number;
}

export interface CopyList {
  listId: number;
  /** LIST ID USAGE: 0 = hold the results for RECEIVE COPY RESULTS; 2, 3 = do not. */
  listIdUsage: number;
  cscds: Cscd[];
  segments: Segment[];
}

export type Parsed = { ok: true; list: CopyList | undefined } | { ok: false; error: SenseDetail };

const illegal = (asc: number, byte?: number): { ok: false; error: SenseDetail } => ({
  ok: false,
  error: { key: SenseKey.illegalRequest, asc, field: byte === undefined ? undefined : { inCdb: false, byte } },
});
const lengthError = (): { ok: false; error: SenseDetail } => illegal(Asc.parameterListLengthError);

function u64(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 0x1_0000_0000 + b.readUInt32BE(at + 4);
}

/**
 * Parse a LID1 parameter list of `listBytes` (the CDB's PARAMETER LIST LENGTH) from `data`.
 * A zero-length list is no copy at all (`list` undefined).
 */
export function parse(data: Buffer, listBytes: number): Parsed {
  if (listBytes === 0) return { ok: true, list: undefined };
  if (listBytes < headerBytes || data.length < listBytes) return lengthError();
  const cscdListBytes = data.readUInt16BE(2);
  const segmentListBytes = data.readUInt32BE(8);
  const inlineBytes = data.readUInt32BE(12);
  // The total first (a list too long is a length error whatever it holds), then the counts.
  if (cscdListBytes + segmentListBytes > xcopyDescriptorListBytesMax) return lengthError();
  if (inlineBytes > xcopyInlineBytesMax) return illegal(Asc.invalidFieldInParameterList, 12);
  if (headerBytes + cscdListBytes + segmentListBytes + inlineBytes > listBytes) return lengthError();
  if (cscdListBytes % cscdBytes !== 0) return lengthError();
  const listIdUsage = (data[1] >> 3) & 0x03;
  if (listIdUsage === 1) return illegal(Asc.invalidFieldInParameterList, 1);
  if (cscdListBytes / cscdBytes > xcopyCscdDescriptorsMax) return illegal(XcopyAsc.tooManyTargetDescriptors);

  const cscds: Cscd[] = [];
  for (let at = headerBytes; at < headerBytes + cscdListBytes; at += cscdBytes) {
    const parsed = parseCscd(data, at);
    if ('error' in parsed) return parsed;
    cscds.push(parsed);
  }
  const segments: Segment[] = [];
  const end = headerBytes + cscdListBytes + segmentListBytes;
  for (let at = headerBytes + cscdListBytes; at < end; ) {
    if (at + 4 > end) return lengthError();
    const descriptorBytes = 4 + data.readUInt16BE(at + 2);
    if (at + descriptorBytes > end) return lengthError();
    if (segments.length >= xcopySegmentDescriptorsMax) return illegal(XcopyAsc.tooManySegmentDescriptors);
    if (data[at] !== blockToBlockSegment) return illegal(XcopyAsc.unsupportedSegmentDescriptorTypeCode, at);
    if (descriptorBytes !== blockToBlockSegmentBytes) return illegal(Asc.invalidFieldInParameterList, at + 2);
    segments.push({
      sourceIndex: data.readUInt16BE(at + 4),
      destinationIndex: data.readUInt16BE(at + 6),
      blocks: data.readUInt16BE(at + 10),
      sourceLba: u64(data, at + 12),
      destinationLba: u64(data, at + 20),
    });
    at += descriptorBytes;
  }
  return { ok: true, list: { listId: data[0], listIdUsage, cscds, segments } };
}

function parseCscd(data: Buffer, at: number): Cscd | { ok: false; error: SenseDetail } {
  if (data[at] !== identificationCscd) return illegal(XcopyAsc.unsupportedTargetDescriptorTypeCode, at);
  // LU ID TYPE (byte 1 bits 7-6) is not checked: the designator alone names the volume, and
  // libiscsi 1.19's conformance test expects a reserved LU ID TYPE to be accepted.
  const designatorBytes = Math.min(data[at + 7], 20);
  return {
    nul: (data[at + 1] & 0x20) !== 0,
    designator: Buffer.from(data.subarray(at + 8, at + 8 + designatorBytes)),
    blockBytes: data.readUIntBE(at + 29, 3),
  };
}

/** COPY ABORTED with one of the ASCs initiators expect for an unusable copy target or range. */
export function copyAborted(asc: number): SenseDetail {
  return { key: SenseKey.copyAborted, asc };
}

/** RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-4 6.18.4). */
export function operatingParameters(): Buffer {
  const implemented = [blockToBlockSegment, identificationCscd];
  const d = Buffer.alloc(44 + implemented.length);
  d.writeUInt32BE(d.length - 4, 0);
  d[4] = 0x01; // SNLID: copies without a held list identifier are supported
  d.writeUInt16BE(xcopyCscdDescriptorsMax, 8);
  d.writeUInt16BE(xcopySegmentDescriptorsMax, 10);
  d.writeUInt32BE(xcopyDescriptorListBytesMax, 12);
  d.writeUInt32BE(xcopySegmentBytesMax, 16);
  d.writeUInt32BE(xcopyInlineBytesMax, 20);
  d.writeUInt32BE(0, 24); // held data limit: no held data
  d.writeUInt16BE(1, 34); // total concurrent copies per I_T nexus
  d[36] = 1; // maximum concurrent copies
  d[37] = 9; // data segment granularity 2^9 (one 512-byte block)
  d[43] = implemented.length;
  implemented.forEach((code, i) => (d[44 + i] = code));
  return d;
}

export interface CopyOutcome {
  listId: number;
  ok: boolean;
  segmentsProcessed: number;
  bytesCopied: number;
}

/** RECEIVE COPY RESULTS, COPY STATUS (LID1, SPC-4 6.18.2). */
export function copyStatus(o: CopyOutcome): Buffer {
  const d = Buffer.alloc(12);
  d.writeUInt32BE(8, 0);
  d[4] = o.ok ? 0x01 : 0x02; // completed without / with errors
  d.writeUInt16BE(Math.min(o.segmentsProcessed, 0xffff), 5);
  d[7] = 0x01; // transfer count in KiB
  d.writeUInt32BE(Math.min(Math.ceil(o.bytesCopied / 1024), 0xffff_ffff), 8);
  return d;
}

/** The Third-party Copy VPD page body: one Supported Commands descriptor (SPC-4 7.8.17). */
export function thirdPartyCopyVpdBody(): Buffer {
  const commands = Buffer.from([0x83, 1, 0x00, 0x84, 2, 0x00, 0x03]);
  const body = Buffer.alloc(4 + 1 + commands.length);
  body.writeUInt16BE(0x0001, 0);
  body.writeUInt16BE(body.length - 4, 2);
  body[4] = commands.length;
  commands.copy(body, 5);
  return body;
}
