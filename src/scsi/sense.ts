// SCSI sense data (SPC-4 4.5): fixed (0x70) or descriptor (0x72) format, as the control
// mode page's D_SENSE bit says. Errors are data: a handler returns a ScsiResult built here.

import { ErrorKind } from '../errors';
import { ScsiStatus, type ScsiResult } from './types';

export const SenseKey = {
  noSense: 0x00,
  recoveredError: 0x01,
  notReady: 0x02,
  mediumError: 0x03,
  hardwareError: 0x04,
  illegalRequest: 0x05,
  unitAttention: 0x06,
  dataProtect: 0x07,
  copyAborted: 0x0a,
  abortedCommand: 0x0b,
  miscompare: 0x0e,
} as const;

/** ASC/ASCQ pairs as asc << 8 | ascq. */
export const Asc = {
  noAdditionalSense: 0x0000,
  invalidCommandOperationCode: 0x2000,
  lbaOutOfRange: 0x2100,
  invalidFieldInCdb: 0x2400,
  logicalUnitNotSupported: 0x2500,
  invalidFieldInParameterList: 0x2600,
  parameterListLengthError: 0x1a00,
  invalidReleaseOfPersistentReservation: 0x2604,
  writeProtected: 0x2700,
  /** SBC-3 thin provisioning: a write needed space the pool does not have. */
  spaceAllocationFailedWriteProtect: 0x2707,
  powerOnReset: 0x2900,
  busDeviceResetOccurred: 0x2903,
  modeParametersChanged: 0x2a01,
  reservationsPreempted: 0x2a03,
  reservationsReleased: 0x2a04,
  registrationsPreempted: 0x2a05,
  asymmetricAccessStateChanged: 0x2a06,
  capacityDataChanged: 0x2a09,
  savingParametersNotSupported: 0x3900,
  miscompareDuringVerify: 0x1d00,
  internalTargetFailure: 0x4400,
  writeError: 0x0c00,
  unrecoveredReadError: 0x1100,
  logicalUnitCommunicationFailure: 0x0800,
  logicalUnitCommunicationTimeout: 0x0801,
  // The data-phase failures RFC 7143 11.4.7.2 lists (with ABORTED COMMAND), and SPC's for tags.
  dataPhaseError: 0x4b00,
  invalidTargetPortTransferTag: 0x4b01,
  dataOffsetError: 0x4b05,
  unexpectedUnsolicitedData: 0x0c0c,
  incorrectAmountOfData: 0x0c0d,
} as const;

export interface SenseDetail {
  key: number;
  asc: number; // asc << 8 | ascq
  /** INFORMATION field (e.g. the miscompare offset). */
  information?: number;
  /** Sense-key specific field pointer: byte (and optionally bit) of the bad field. */
  field?: { inCdb: boolean; byte: number; bit?: number };
}

export function buildSense(d: SenseDetail, descriptor: boolean): Buffer {
  const sks = d.field ? sksBytes(d.field) : undefined;
  if (!descriptor) {
    const s = Buffer.alloc(18);
    s[0] = 0x70 | (d.information !== undefined ? 0x80 : 0);
    s[2] = d.key;
    if (d.information !== undefined) s.writeUInt32BE(d.information >>> 0, 3);
    s[7] = 10;
    s[12] = d.asc >> 8;
    s[13] = d.asc & 0xff;
    if (sks) sks.copy(s, 15);
    return s;
  }
  const descriptors: Buffer[] = [];
  if (d.information !== undefined) {
    const info = Buffer.alloc(12);
    info[0] = 0x00;
    info[1] = 0x0a;
    info[2] = 0x80;
    info.writeBigUInt64BE(BigInt(d.information), 4);
    descriptors.push(info);
  }
  if (sks) {
    const k = Buffer.alloc(8);
    k[0] = 0x02;
    k[1] = 0x06;
    sks.copy(k, 4);
    descriptors.push(k);
  }
  const body = Buffer.concat(descriptors);
  const s = Buffer.alloc(8 + body.length);
  s[0] = 0x72;
  s[1] = d.key;
  s[2] = d.asc >> 8;
  s[3] = d.asc & 0xff;
  s[7] = body.length;
  body.copy(s, 8);
  return s;
}

function sksBytes(f: { inCdb: boolean; byte: number; bit?: number }): Buffer {
  const b = Buffer.alloc(3);
  b[0] = 0x80 | (f.inCdb ? 0x40 : 0) | (f.bit !== undefined ? 0x08 | (f.bit & 7) : 0);
  b.writeUInt16BE(f.byte, 1);
  return b;
}

/** A CHECK CONDITION result; `descriptor` from the LU's current D_SENSE. */
export function checkCondition(d: SenseDetail, descriptor: boolean): ScsiResult {
  return { status: ScsiStatus.checkCondition, sense: buildSense(d, descriptor) };
}

/**
 * How a failed command is answered, by the kind of its error (src/errors.ts), chosen by what
 * initiators do with the answer. Linux retries ABORTED COMMAND and BUSY; QEMU's libiscsi
 * retries only BUSY, TASK SET FULL and UNIT ATTENTION and fails the I/O on ABORTED COMMAND.
 * So a transient state is BUSY (both retry); a copy nobody can reach is ABORTED COMMAND /
 * LOGICAL UNIT COMMUNICATION FAILURE (or TIME-OUT), which Linux still retries; the store's own
 * failures are MEDIUM ERROR as a disk reports them; HARDWARE ERROR is left for what we cannot
 * classify (a bug), never for a peer that is down. A request the owner refused as invalid
 * (peers of different versions, a resize racing the request) is ABORTED COMMAND as well: the
 * data cannot be reached by this request, and a retry sees the settled state.
 */
export const senseForKind: Readonly<Record<ErrorKind, SenseDetail | 'busy'>> = {
  [ErrorKind.other]: { key: SenseKey.hardwareError, asc: Asc.internalTargetFailure },
  [ErrorKind.storeRead]: { key: SenseKey.mediumError, asc: Asc.unrecoveredReadError },
  [ErrorKind.storeWrite]: { key: SenseKey.mediumError, asc: Asc.writeError },
  [ErrorKind.noSpace]: { key: SenseKey.dataProtect, asc: Asc.spaceAllocationFailedWriteProtect },
  [ErrorKind.busy]: 'busy',
  [ErrorKind.unavailable]: { key: SenseKey.abortedCommand, asc: Asc.logicalUnitCommunicationFailure },
  [ErrorKind.timedOut]: { key: SenseKey.abortedCommand, asc: Asc.logicalUnitCommunicationTimeout },
  [ErrorKind.readOnly]: { key: SenseKey.dataProtect, asc: Asc.writeProtected },
  [ErrorKind.invalid]: { key: SenseKey.abortedCommand, asc: Asc.logicalUnitCommunicationFailure },
};

/** The answer to a command that failed with an error of `kind` (`descriptor`: the LU's D_SENSE). */
export function failedCommand(kind: ErrorKind, descriptor: boolean): ScsiResult {
  const d = senseForKind[kind];
  return d === 'busy' ? { status: ScsiStatus.busy } : checkCondition(d, descriptor);
}
