// iSCSI PDU model (RFC 7143 section 11). The codec (pdu.ts) turns bytes into these and back;
// login.ts and session.ts consume and produce them. No I/O here.
//
// Buffers in a decoded PDU (`data`, `cdb`, `lun`, `ahs`) may be views into the parser's
// input: a consumer that keeps one past the current event must copy it.

export const Op = {
  // initiator → target
  nopOut: 0x00,
  scsiCommand: 0x01,
  taskMgmtRequest: 0x02,
  loginRequest: 0x03,
  textRequest: 0x04,
  dataOut: 0x05,
  logoutRequest: 0x06,
  snack: 0x10,
  // target → initiator
  nopIn: 0x20,
  scsiResponse: 0x21,
  taskMgmtResponse: 0x22,
  loginResponse: 0x23,
  textResponse: 0x24,
  dataIn: 0x25,
  logoutResponse: 0x26,
  r2t: 0x31,
  asyncMessage: 0x32,
  reject: 0x3f,
} as const;
export type Opcode = (typeof Op)[keyof typeof Op];

/** Reject reasons (RFC 7143 11.17.1). */
export const RejectReason = {
  dataDigestError: 0x02,
  snackReject: 0x03,
  protocolError: 0x04,
  commandNotSupported: 0x05,
  immediateCommandReject: 0x06,
  taskInProgress: 0x07,
  invalidDataAck: 0x08,
  invalidPduField: 0x09,
  longOperationReject: 0x0a,
  waitingForLogout: 0x0c,
} as const;

/** Login status class/detail as one 16-bit number: class << 8 | detail (RFC 7143 11.13.5). */
export const LoginStatus = {
  success: 0x0000,
  targetMovedTemporarily: 0x0101,
  targetMovedPermanently: 0x0102,
  initiatorError: 0x0200,
  authenticationFailure: 0x0201,
  authorizationFailure: 0x0202,
  targetNotFound: 0x0203,
  targetRemoved: 0x0204,
  unsupportedVersion: 0x0205,
  tooManyConnections: 0x0206,
  missingParameter: 0x0207,
  cantIncludeInSession: 0x0208,
  sessionTypeNotSupported: 0x0209,
  sessionDoesNotExist: 0x020a,
  invalidDuringLogin: 0x020b,
  targetError: 0x0300,
  serviceUnavailable: 0x0301,
  outOfResources: 0x0302,
} as const;

/** Login stages (CSG/NSG). */
export const Stage = { security: 0, operational: 1, fullFeature: 3 } as const;

/** Task management functions (RFC 7143 11.5.1). */
export const TmfFunction = {
  abortTask: 1,
  abortTaskSet: 2,
  clearAca: 3,
  clearTaskSet: 4,
  logicalUnitReset: 5,
  targetWarmReset: 6,
  targetColdReset: 7,
  taskReassign: 8,
} as const;

/** Task management responses (RFC 7143 11.6.1). */
export const TmfResponse = {
  complete: 0,
  taskDoesNotExist: 1,
  lunDoesNotExist: 2,
  taskStillAllegiant: 3,
  reassignmentNotSupported: 4,
  notSupported: 5,
  authorizationFailed: 6,
  rejected: 255,
} as const;

/** SCSI Response "response" byte (RFC 7143 11.4.3). */
export const ScsiResponseCode = { completed: 0x00, targetFailure: 0x01 } as const;

/** Async message events (RFC 7143 11.9.1). */
export const AsyncEvent = {
  scsiAsyncEvent: 0,
  requestLogout: 1,
  dropConnection: 2,
  dropAllConnections: 3,
  renegotiate: 4,
  vendor: 255,
} as const;

/** Logout reason (request) and response codes (RFC 7143 11.14.1, 11.15.1). */
export const LogoutReason = { closeSession: 0, closeConnection: 1, removeConnectionForRecovery: 2 } as const;
export const LogoutResponseCode = {
  success: 0,
  cidNotFound: 1,
  recoveryNotSupported: 2,
  cleanupFailed: 3,
} as const;

/** Fields every PDU has. `data` is the data segment without padding or digest. */
export interface PduBase {
  immediate: boolean;
  /** The 'F' bit where the opcode has one. */
  final: boolean;
  initiatorTaskTag: number;
  data: Buffer;
  /** Additional header segments, raw (only the extended-CDB AHS is interpreted). */
  ahs?: Buffer;
}

// ---- initiator → target ---------------------------------------------------------------

export interface NopOutPdu extends PduBase {
  opcode: typeof Op.nopOut;
  lun: Buffer;
  targetTransferTag: number;
  cmdSN: number;
  expStatSN: number;
}

export interface ScsiCommandPdu extends PduBase {
  opcode: typeof Op.scsiCommand;
  read: boolean;
  write: boolean;
  /** Task attribute (SAM): 0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA. */
  taskAttr: number;
  lun: Buffer;
  expectedDataTransferLength: number;
  cmdSN: number;
  expStatSN: number;
  /** 16 bytes from the BHS, extended by the extended-CDB AHS when present. */
  cdb: Buffer;
}

export interface TaskMgmtRequestPdu extends PduBase {
  opcode: typeof Op.taskMgmtRequest;
  function: number;
  lun: Buffer;
  referencedTaskTag: number;
  cmdSN: number;
  expStatSN: number;
  refCmdSN: number;
  expDataSN: number;
}

export interface LoginRequestPdu extends PduBase {
  opcode: typeof Op.loginRequest;
  /** The T bit. (`final` mirrors it for convenience.) */
  transit: boolean;
  continue: boolean;
  csg: number;
  nsg: number;
  versionMax: number;
  versionMin: number;
  /** 6 bytes. */
  isid: Buffer;
  tsih: number;
  cid: number;
  cmdSN: number;
  expStatSN: number;
}

export interface TextRequestPdu extends PduBase {
  opcode: typeof Op.textRequest;
  continue: boolean;
  lun: Buffer;
  targetTransferTag: number;
  cmdSN: number;
  expStatSN: number;
}

export interface DataOutPdu extends PduBase {
  opcode: typeof Op.dataOut;
  lun: Buffer;
  targetTransferTag: number;
  expStatSN: number;
  dataSN: number;
  bufferOffset: number;
}

export interface LogoutRequestPdu extends PduBase {
  opcode: typeof Op.logoutRequest;
  reasonCode: number;
  cid: number;
  cmdSN: number;
  expStatSN: number;
}

export interface SnackPdu extends PduBase {
  opcode: typeof Op.snack;
  type: number;
  lun: Buffer;
  targetTransferTag: number;
  expStatSN: number;
  begRun: number;
  runLength: number;
}

// ---- target → initiator ---------------------------------------------------------------

export interface NopInPdu extends PduBase {
  opcode: typeof Op.nopIn;
  lun: Buffer;
  targetTransferTag: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
}

export interface ScsiResponsePdu extends PduBase {
  opcode: typeof Op.scsiResponse;
  bidiOverflow: boolean;
  bidiUnderflow: boolean;
  overflow: boolean;
  underflow: boolean;
  response: number;
  status: number;
  snackTag: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  expDataSN: number;
  bidiResidualCount: number;
  residualCount: number;
  // `data` carries SenseLength (2 bytes, big-endian) + sense data when status is CHECK CONDITION.
}

export interface TaskMgmtResponsePdu extends PduBase {
  opcode: typeof Op.taskMgmtResponse;
  response: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
}

export interface LoginResponsePdu extends PduBase {
  opcode: typeof Op.loginResponse;
  transit: boolean;
  continue: boolean;
  csg: number;
  nsg: number;
  versionMax: number;
  versionActive: number;
  isid: Buffer;
  tsih: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  /** class << 8 | detail, see LoginStatus. */
  status: number;
}

export interface TextResponsePdu extends PduBase {
  opcode: typeof Op.textResponse;
  continue: boolean;
  lun: Buffer;
  targetTransferTag: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
}

export interface DataInPdu extends PduBase {
  opcode: typeof Op.dataIn;
  acknowledge: boolean;
  overflow: boolean;
  underflow: boolean;
  /** S bit: this PDU carries the command's status. */
  hasStatus: boolean;
  status: number;
  lun: Buffer;
  targetTransferTag: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  dataSN: number;
  bufferOffset: number;
  residualCount: number;
}

export interface LogoutResponsePdu extends PduBase {
  opcode: typeof Op.logoutResponse;
  response: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  time2Wait: number;
  time2Retain: number;
}

export interface R2tPdu extends PduBase {
  opcode: typeof Op.r2t;
  lun: Buffer;
  targetTransferTag: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  r2tSN: number;
  bufferOffset: number;
  desiredDataTransferLength: number;
}

export interface AsyncMessagePdu extends PduBase {
  opcode: typeof Op.asyncMessage;
  lun: Buffer;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  asyncEvent: number;
  asyncVCode: number;
  parameter1: number;
  parameter2: number;
  parameter3: number;
}

export interface RejectPdu extends PduBase {
  opcode: typeof Op.reject;
  reason: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
  dataSN: number;
  // `data` is the complete header (BHS) of the rejected PDU.
}

export type InitiatorPdu =
  | NopOutPdu
  | ScsiCommandPdu
  | TaskMgmtRequestPdu
  | LoginRequestPdu
  | TextRequestPdu
  | DataOutPdu
  | LogoutRequestPdu
  | SnackPdu;

export type TargetPdu =
  | NopInPdu
  | ScsiResponsePdu
  | TaskMgmtResponsePdu
  | LoginResponsePdu
  | TextResponsePdu
  | DataInPdu
  | LogoutResponsePdu
  | R2tPdu
  | AsyncMessagePdu
  | RejectPdu;

export type Pdu = InitiatorPdu | TargetPdu;

/** Operational parameters in force for a session after login (RFC 7143 section 13). */
export interface SessionParams {
  /** What we declared: the largest data segment the initiator may send us. */
  maxRecvDataSegmentLength: number;
  /** What the initiator declared: the largest data segment we may send it. */
  maxXmitDataSegmentLength: number;
  maxBurstLength: number;
  firstBurstLength: number;
  immediateData: boolean;
  initialR2T: boolean;
  maxOutstandingR2T: number;
  dataPDUInOrder: boolean;
  dataSequenceInOrder: boolean;
  errorRecoveryLevel: number;
  defaultTime2Wait: number;
  defaultTime2Retain: number;
  maxConnections: number;
  headerDigest: boolean;
  dataDigest: boolean;
}

/** The SCSI LUN field for LUN 0 (and the helper to read a single-level LUN). */
export const lunZero: Buffer = Buffer.alloc(8);

/** SAM single-level LUN from the 8-byte field (peripheral or flat addressing). */
export function lunIndex(lun: Buffer): number {
  return ((lun[0] & 0x3f) << 8) | lun[1];
}
