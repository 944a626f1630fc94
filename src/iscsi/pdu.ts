// iSCSI PDU codec (RFC 7143 section 11): pure functions between bytes and the typed PDUs of
// types.ts, in both directions (tests play the initiator). No sockets here; parser.ts frames
// the byte stream, connection.ts wires it to a socket.

import { ProtocolError } from '../errors';
import { bhsBytes } from '../limits';
import { digestBuffer } from './digest';
import {
  Op,
  RejectReason,
  type AsyncMessagePdu,
  type DataInPdu,
  type DataOutPdu,
  type LoginRequestPdu,
  type LoginResponsePdu,
  type LogoutRequestPdu,
  type LogoutResponsePdu,
  type NopInPdu,
  type NopOutPdu,
  type Pdu,
  type R2tPdu,
  type RejectPdu,
  type ScsiCommandPdu,
  type ScsiResponsePdu,
  type SnackPdu,
  type TaskMgmtRequestPdu,
  type TaskMgmtResponsePdu,
  type TextRequestPdu,
  type TextResponsePdu,
} from './types';

// ---- BHS accessors (for the parser and for Reject) --------------------------------------

export function bhsOpcode(bhs: Buffer): number {
  return bhs[0] & 0x3f;
}
export function bhsAhsLength(bhs: Buffer): number {
  return bhs[4] * 4;
}
export function bhsDataSegmentLength(bhs: Buffer): number {
  return (bhs[5] << 16) | (bhs[6] << 8) | bhs[7];
}
export function bhsInitiatorTaskTag(bhs: Buffer): number {
  return bhs.readUInt32BE(16);
}

/** Bytes of padding after a data segment of `length` bytes. */
export function padBytes(length: number): number {
  return (4 - (length & 3)) & 3;
}

const zeroPad = Buffer.alloc(4);
const emptyBuffer = Buffer.alloc(0);

// ---- decode -----------------------------------------------------------------------------

type Decoder = (b: Buffer, immediate: boolean, itt: number, data: Buffer, ahs: Buffer | undefined) => Pdu;

const lunOf = (b: Buffer): Buffer => b.subarray(8, 16);
const u32 = (b: Buffer, o: number): number => b.readUInt32BE(o);
const u16 = (b: Buffer, o: number): number => b.readUInt16BE(o);
const fBit = (b: Buffer): boolean => (b[1] & 0x80) !== 0;

/** Extended CDB AHS (type 1): its data follows the 16 CDB bytes in the BHS. */
function extendedCdb(bhsCdb: Buffer, ahs: Buffer | undefined): Buffer {
  if (!ahs || ahs.length === 0) return bhsCdb;
  let off = 0;
  while (off + 3 <= ahs.length) {
    const ahsLength = ahs.readUInt16BE(off);
    const ahsType = ahs[off + 2];
    const start = off + 4; // 2 length + 1 type + 1 reserved
    if (start + ahsLength - 1 > ahs.length) {
      throw new ProtocolError('AHS length runs past the header', RejectReason.invalidPduField);
    }
    if (ahsType === 1) {
      // AHSLength counts the reserved byte plus the extra CDB bytes.
      return Buffer.concat([bhsCdb, ahs.subarray(start, start + ahsLength - 1)]);
    }
    off += (4 + ahsLength - 1 + 3) & ~3;
  }
  return bhsCdb;
}

const decoders: Partial<Record<number, Decoder>> = {
  [Op.nopOut]: (b, immediate, itt, data): NopOutPdu => ({
    opcode: Op.nopOut, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    lun: lunOf(b), targetTransferTag: u32(b, 20), cmdSN: u32(b, 24), expStatSN: u32(b, 28),
  }),
  [Op.scsiCommand]: (b, immediate, itt, data, ahs): ScsiCommandPdu => ({
    opcode: Op.scsiCommand, immediate, final: fBit(b), initiatorTaskTag: itt, data, ahs,
    read: (b[1] & 0x40) !== 0, write: (b[1] & 0x20) !== 0, taskAttr: b[1] & 0x07,
    lun: lunOf(b), expectedDataTransferLength: u32(b, 20), cmdSN: u32(b, 24), expStatSN: u32(b, 28),
    cdb: extendedCdb(b.subarray(32, 48), ahs),
  }),
  [Op.taskMgmtRequest]: (b, immediate, itt, data): TaskMgmtRequestPdu => ({
    opcode: Op.taskMgmtRequest, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    function: b[1] & 0x7f, lun: lunOf(b), referencedTaskTag: u32(b, 20), cmdSN: u32(b, 24),
    expStatSN: u32(b, 28), refCmdSN: u32(b, 32), expDataSN: u32(b, 36),
  }),
  [Op.loginRequest]: (b, immediate, itt, data): LoginRequestPdu => ({
    opcode: Op.loginRequest, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    transit: (b[1] & 0x80) !== 0, continue: (b[1] & 0x40) !== 0, csg: (b[1] >> 2) & 3, nsg: b[1] & 3,
    versionMax: b[2], versionMin: b[3], isid: b.subarray(8, 14), tsih: u16(b, 14), cid: u16(b, 20),
    cmdSN: u32(b, 24), expStatSN: u32(b, 28),
  }),
  [Op.textRequest]: (b, immediate, itt, data): TextRequestPdu => ({
    opcode: Op.textRequest, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    continue: (b[1] & 0x40) !== 0, lun: lunOf(b), targetTransferTag: u32(b, 20), cmdSN: u32(b, 24),
    expStatSN: u32(b, 28),
  }),
  [Op.dataOut]: (b, immediate, itt, data): DataOutPdu => ({
    opcode: Op.dataOut, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    lun: lunOf(b), targetTransferTag: u32(b, 20), expStatSN: u32(b, 28), dataSN: u32(b, 36),
    bufferOffset: u32(b, 40),
  }),
  [Op.logoutRequest]: (b, immediate, itt, data): LogoutRequestPdu => ({
    opcode: Op.logoutRequest, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    reasonCode: b[1] & 0x7f, cid: u16(b, 20), cmdSN: u32(b, 24), expStatSN: u32(b, 28),
  }),
  [Op.snack]: (b, immediate, itt, data): SnackPdu => ({
    opcode: Op.snack, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    type: b[1] & 0x0f, lun: lunOf(b), targetTransferTag: u32(b, 20), expStatSN: u32(b, 28),
    begRun: u32(b, 40), runLength: u32(b, 44),
  }),
  [Op.nopIn]: (b, immediate, itt, data): NopInPdu => ({
    opcode: Op.nopIn, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    lun: lunOf(b), targetTransferTag: u32(b, 20), statSN: u32(b, 24), expCmdSN: u32(b, 28), maxCmdSN: u32(b, 32),
  }),
  [Op.scsiResponse]: (b, immediate, itt, data): ScsiResponsePdu => ({
    opcode: Op.scsiResponse, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    bidiOverflow: (b[1] & 0x10) !== 0, bidiUnderflow: (b[1] & 0x08) !== 0,
    overflow: (b[1] & 0x04) !== 0, underflow: (b[1] & 0x02) !== 0, response: b[2], status: b[3],
    snackTag: u32(b, 20), statSN: u32(b, 24), expCmdSN: u32(b, 28), maxCmdSN: u32(b, 32),
    expDataSN: u32(b, 36), bidiResidualCount: u32(b, 40), residualCount: u32(b, 44),
  }),
  [Op.taskMgmtResponse]: (b, immediate, itt, data): TaskMgmtResponsePdu => ({
    opcode: Op.taskMgmtResponse, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    response: b[2], statSN: u32(b, 24), expCmdSN: u32(b, 28), maxCmdSN: u32(b, 32),
  }),
  [Op.loginResponse]: (b, immediate, itt, data): LoginResponsePdu => ({
    opcode: Op.loginResponse, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    transit: (b[1] & 0x80) !== 0, continue: (b[1] & 0x40) !== 0, csg: (b[1] >> 2) & 3, nsg: b[1] & 3,
    versionMax: b[2], versionActive: b[3], isid: b.subarray(8, 14), tsih: u16(b, 14),
    statSN: u32(b, 24), expCmdSN: u32(b, 28), maxCmdSN: u32(b, 32), status: u16(b, 36),
  }),
  [Op.textResponse]: (b, immediate, itt, data): TextResponsePdu => ({
    opcode: Op.textResponse, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    continue: (b[1] & 0x40) !== 0, lun: lunOf(b), targetTransferTag: u32(b, 20), statSN: u32(b, 24),
    expCmdSN: u32(b, 28), maxCmdSN: u32(b, 32),
  }),
  [Op.dataIn]: (b, immediate, itt, data): DataInPdu => ({
    opcode: Op.dataIn, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    acknowledge: (b[1] & 0x40) !== 0, overflow: (b[1] & 0x04) !== 0, underflow: (b[1] & 0x02) !== 0,
    hasStatus: (b[1] & 0x01) !== 0, status: b[3], lun: lunOf(b), targetTransferTag: u32(b, 20),
    statSN: u32(b, 24), expCmdSN: u32(b, 28), maxCmdSN: u32(b, 32), dataSN: u32(b, 36),
    bufferOffset: u32(b, 40), residualCount: u32(b, 44),
  }),
  [Op.logoutResponse]: (b, immediate, itt, data): LogoutResponsePdu => ({
    opcode: Op.logoutResponse, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    response: b[2], statSN: u32(b, 24), expCmdSN: u32(b, 28), maxCmdSN: u32(b, 32),
    time2Wait: u16(b, 40), time2Retain: u16(b, 42),
  }),
  [Op.r2t]: (b, immediate, itt, data): R2tPdu => ({
    opcode: Op.r2t, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    lun: lunOf(b), targetTransferTag: u32(b, 20), statSN: u32(b, 24), expCmdSN: u32(b, 28),
    maxCmdSN: u32(b, 32), r2tSN: u32(b, 36), bufferOffset: u32(b, 40), desiredDataTransferLength: u32(b, 44),
  }),
  [Op.asyncMessage]: (b, immediate, itt, data): AsyncMessagePdu => ({
    opcode: Op.asyncMessage, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    lun: lunOf(b), statSN: u32(b, 24), expCmdSN: u32(b, 28), maxCmdSN: u32(b, 32), asyncEvent: b[36],
    asyncVCode: b[37], parameter1: u16(b, 38), parameter2: u16(b, 40), parameter3: u16(b, 42),
  }),
  [Op.reject]: (b, immediate, itt, data): RejectPdu => ({
    opcode: Op.reject, immediate, final: fBit(b), initiatorTaskTag: itt, data,
    reason: b[2], statSN: u32(b, 24), expCmdSN: u32(b, 28), maxCmdSN: u32(b, 32), dataSN: u32(b, 36),
  }),
};

/**
 * Decode one PDU whose framing (lengths, digests) the parser already checked. `data` is the
 * data segment without padding. Throws ProtocolError (with a Reject reason) for an opcode we
 * do not know.
 */
export function decodePdu(bhs: Buffer, ahs: Buffer | undefined, data: Buffer): Pdu {
  const decoder = decoders[bhsOpcode(bhs)];
  if (!decoder) {
    throw new ProtocolError(`unknown opcode 0x${bhsOpcode(bhs).toString(16)}`, RejectReason.commandNotSupported);
  }
  return decoder(bhs, (bhs[0] & 0x40) !== 0, bhsInitiatorTaskTag(bhs), data, ahs);
}

// ---- encode -----------------------------------------------------------------------------

type Encoder<P extends Pdu> = (b: Buffer, p: P) => void;

const setLun = (b: Buffer, lun: Buffer): void => {
  lun.copy(b, 8, 0, 8);
};

/** CmdSN and ExpStatSN at bytes 24-31: every initiator PDU that has them. */
const setCommandSns = (b: Buffer, cmdSN: number, expStatSN: number): void => {
  b.writeUInt32BE(cmdSN >>> 0, 24);
  b.writeUInt32BE(expStatSN >>> 0, 28);
};

/** StatSN, ExpCmdSN, MaxCmdSN at bytes 24-35: every target PDU carries them there. */
const setStatus = (b: Buffer, statSN: number, expCmdSN: number, maxCmdSN: number): void => {
  b.writeUInt32BE(statSN >>> 0, 24);
  b.writeUInt32BE(expCmdSN >>> 0, 28);
  b.writeUInt32BE(maxCmdSN >>> 0, 32);
};

const encoders: { [K in Pdu['opcode']]: Encoder<Extract<Pdu, { opcode: K }>> } = {
  [Op.nopOut]: (b, p) => {
    b[1] = 0x80;
    setLun(b, p.lun);
    b.writeUInt32BE(p.targetTransferTag >>> 0, 20);
    setCommandSns(b, p.cmdSN, p.expStatSN);
  },
  [Op.scsiCommand]: (b, p) => {
    b[1] = (p.final ? 0x80 : 0) | (p.read ? 0x40 : 0) | (p.write ? 0x20 : 0) | (p.taskAttr & 7);
    setLun(b, p.lun);
    b.writeUInt32BE(p.expectedDataTransferLength >>> 0, 20);
    setCommandSns(b, p.cmdSN, p.expStatSN);
    p.cdb.copy(b, 32, 0, Math.min(16, p.cdb.length));
  },
  [Op.taskMgmtRequest]: (b, p) => {
    b[1] = 0x80 | (p.function & 0x7f);
    setLun(b, p.lun);
    b.writeUInt32BE(p.referencedTaskTag >>> 0, 20);
    setCommandSns(b, p.cmdSN, p.expStatSN);
    b.writeUInt32BE(p.refCmdSN >>> 0, 32);
    b.writeUInt32BE(p.expDataSN >>> 0, 36);
  },
  [Op.loginRequest]: (b, p) => {
    b[1] = (p.transit ? 0x80 : 0) | (p.continue ? 0x40 : 0) | ((p.csg & 3) << 2) | (p.nsg & 3);
    b[2] = p.versionMax;
    b[3] = p.versionMin;
    p.isid.copy(b, 8, 0, 6);
    b.writeUInt16BE(p.tsih, 14);
    b.writeUInt16BE(p.cid, 20);
    setCommandSns(b, p.cmdSN, p.expStatSN);
  },
  [Op.textRequest]: (b, p) => {
    b[1] = (p.final ? 0x80 : 0) | (p.continue ? 0x40 : 0);
    setLun(b, p.lun);
    b.writeUInt32BE(p.targetTransferTag >>> 0, 20);
    setCommandSns(b, p.cmdSN, p.expStatSN);
  },
  [Op.dataOut]: (b, p) => {
    b[1] = p.final ? 0x80 : 0;
    setLun(b, p.lun);
    b.writeUInt32BE(p.targetTransferTag >>> 0, 20);
    b.writeUInt32BE(p.expStatSN >>> 0, 28);
    b.writeUInt32BE(p.dataSN >>> 0, 36);
    b.writeUInt32BE(p.bufferOffset >>> 0, 40);
  },
  [Op.logoutRequest]: (b, p) => {
    b[1] = 0x80 | (p.reasonCode & 0x7f);
    b.writeUInt16BE(p.cid, 20);
    setCommandSns(b, p.cmdSN, p.expStatSN);
  },
  [Op.snack]: (b, p) => {
    b[1] = 0x80 | (p.type & 0x0f);
    setLun(b, p.lun);
    b.writeUInt32BE(p.targetTransferTag >>> 0, 20);
    b.writeUInt32BE(p.expStatSN >>> 0, 28);
    b.writeUInt32BE(p.begRun >>> 0, 40);
    b.writeUInt32BE(p.runLength >>> 0, 44);
  },
  [Op.nopIn]: (b, p) => {
    b[1] = 0x80;
    setLun(b, p.lun);
    b.writeUInt32BE(p.targetTransferTag >>> 0, 20);
    setStatus(b, p.statSN, p.expCmdSN, p.maxCmdSN);
  },
  [Op.scsiResponse]: (b, p) => {
    b[1] = 0x80 | (p.bidiOverflow ? 0x10 : 0) | (p.bidiUnderflow ? 0x08 : 0) | (p.overflow ? 0x04 : 0) | (p.underflow ? 0x02 : 0);
    b[2] = p.response;
    b[3] = p.status;
    b.writeUInt32BE(p.snackTag >>> 0, 20);
    setStatus(b, p.statSN, p.expCmdSN, p.maxCmdSN);
    b.writeUInt32BE(p.expDataSN >>> 0, 36);
    b.writeUInt32BE(p.bidiResidualCount >>> 0, 40);
    b.writeUInt32BE(p.residualCount >>> 0, 44);
  },
  [Op.taskMgmtResponse]: (b, p) => {
    b[1] = 0x80;
    b[2] = p.response;
    setStatus(b, p.statSN, p.expCmdSN, p.maxCmdSN);
  },
  [Op.loginResponse]: (b, p) => {
    b[1] = (p.transit ? 0x80 : 0) | (p.continue ? 0x40 : 0) | ((p.csg & 3) << 2) | (p.nsg & 3);
    b[2] = p.versionMax;
    b[3] = p.versionActive;
    p.isid.copy(b, 8, 0, 6);
    b.writeUInt16BE(p.tsih, 14);
    setStatus(b, p.statSN, p.expCmdSN, p.maxCmdSN);
    b.writeUInt16BE(p.status, 36);
  },
  [Op.textResponse]: (b, p) => {
    b[1] = (p.final ? 0x80 : 0) | (p.continue ? 0x40 : 0);
    setLun(b, p.lun);
    b.writeUInt32BE(p.targetTransferTag >>> 0, 20);
    setStatus(b, p.statSN, p.expCmdSN, p.maxCmdSN);
  },
  [Op.dataIn]: (b, p) => {
    b[1] = (p.final ? 0x80 : 0) | (p.acknowledge ? 0x40 : 0) | (p.hasStatus ? (p.overflow ? 0x04 : 0) | (p.underflow ? 0x02 : 0) | 0x01 : 0);
    b[3] = p.hasStatus ? p.status : 0;
    setLun(b, p.lun);
    b.writeUInt32BE(p.targetTransferTag >>> 0, 20);
    b.writeUInt32BE(p.hasStatus ? p.statSN >>> 0 : 0, 24);
    b.writeUInt32BE(p.expCmdSN >>> 0, 28);
    b.writeUInt32BE(p.maxCmdSN >>> 0, 32);
    b.writeUInt32BE(p.dataSN >>> 0, 36);
    b.writeUInt32BE(p.bufferOffset >>> 0, 40);
    b.writeUInt32BE(p.hasStatus ? p.residualCount >>> 0 : 0, 44);
  },
  [Op.logoutResponse]: (b, p) => {
    b[1] = 0x80;
    b[2] = p.response;
    setStatus(b, p.statSN, p.expCmdSN, p.maxCmdSN);
    b.writeUInt16BE(p.time2Wait, 40);
    b.writeUInt16BE(p.time2Retain, 42);
  },
  [Op.r2t]: (b, p) => {
    b[1] = 0x80;
    setLun(b, p.lun);
    b.writeUInt32BE(p.targetTransferTag >>> 0, 20);
    setStatus(b, p.statSN, p.expCmdSN, p.maxCmdSN);
    b.writeUInt32BE(p.r2tSN >>> 0, 36);
    b.writeUInt32BE(p.bufferOffset >>> 0, 40);
    b.writeUInt32BE(p.desiredDataTransferLength >>> 0, 44);
  },
  [Op.asyncMessage]: (b, p) => {
    b[1] = 0x80;
    setLun(b, p.lun);
    setStatus(b, p.statSN, p.expCmdSN, p.maxCmdSN);
    b[36] = p.asyncEvent;
    b[37] = p.asyncVCode;
    b.writeUInt16BE(p.parameter1, 38);
    b.writeUInt16BE(p.parameter2, 40);
    b.writeUInt16BE(p.parameter3, 42);
  },
  [Op.reject]: (b, p) => {
    b[1] = 0x80;
    b[2] = p.reason;
    setStatus(b, p.statSN, p.expCmdSN, p.maxCmdSN);
    b.writeUInt32BE(p.dataSN >>> 0, 36);
  },
};

/** Extended-CDB AHS for CDBs longer than 16 bytes (test initiators only send those). */
function ahsFor(p: Pdu): Buffer {
  if (p.opcode === Op.scsiCommand && p.cdb.length > 16) {
    const extra = p.cdb.subarray(16);
    const ahs = Buffer.alloc((4 + extra.length + 3) & ~3);
    ahs.writeUInt16BE(extra.length + 1, 0);
    ahs[2] = 1;
    extra.copy(ahs, 4);
    return ahs;
  }
  return p.ahs ?? emptyBuffer;
}

/**
 * Encode a PDU into the chunks to write, in order: header (BHS + AHS + header digest), then,
 * when there is data, the data segment itself (not copied), its padding and data digest.
 */
export function encodePdu(pdu: Pdu, digests: { header: boolean; data: boolean }): Buffer[] {
  const ahs = ahsFor(pdu);
  const headerBytes = bhsBytes + ahs.length;
  // From Node's shared pool (a slice of an 8 KiB slab, zeroed for the reserved fields): a
  // Buffer.alloc of its own per PDU would be one more ArrayBuffer for the GC to track.
  const header = Buffer.allocUnsafe(headerBytes + (digests.header ? 4 : 0)).fill(0);
  header[0] = pdu.opcode | (pdu.immediate ? 0x40 : 0);
  header[4] = ahs.length / 4;
  const dataLength = pdu.data.length;
  header[5] = (dataLength >> 16) & 0xff;
  header[6] = (dataLength >> 8) & 0xff;
  header[7] = dataLength & 0xff;
  header.writeUInt32BE(pdu.initiatorTaskTag >>> 0, 16);
  (encoders[pdu.opcode] as Encoder<Pdu>)(header, pdu);
  if (ahs.length > 0) ahs.copy(header, bhsBytes);
  if (digests.header) {
    digestBuffer(header.subarray(0, headerBytes)).copy(header, headerBytes);
  }
  if (dataLength === 0) return [header];
  const pad = padBytes(dataLength);
  const chunks = [header, pdu.data];
  const padding = pad > 0 ? zeroPad.subarray(0, pad) : emptyBuffer;
  if (digests.data) {
    chunks.push(Buffer.concat([padding, digestBuffer(pdu.data, padding)]));
  } else if (pad > 0) {
    chunks.push(padding);
  }
  return chunks;
}

/** Encode to one contiguous buffer (tests, small PDUs). */
export function encodePduToBuffer(pdu: Pdu, digests = { header: false, data: false }): Buffer {
  return Buffer.concat(encodePdu(pdu, digests));
}
