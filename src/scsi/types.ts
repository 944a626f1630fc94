// The contract between the iSCSI transport and a SCSI logical unit. The transport gathers
// all of a command's data-out first (bounded by limits.transferBytesMax), then calls
// `execute`; it sends `dataIn` and the status, computing residuals against the iSCSI
// Expected Data Transfer Length.

/** SAM status codes. */
export const ScsiStatus = {
  good: 0x00,
  checkCondition: 0x02,
  conditionMet: 0x04,
  busy: 0x08,
  reservationConflict: 0x18,
  taskSetFull: 0x28,
  acaActive: 0x30,
  taskAborted: 0x40,
} as const;

/** The I_T nexus a command arrives on: what reservations and unit attentions are kept per. */
export interface Nexus {
  /** iSCSI initiator port name: "<InitiatorName>,i,0x<ISID hex>". */
  initiatorPort: string;
  initiatorName: string;
  /** iSCSI target port name: "<TargetName>,t,0x<TPGT hex>". */
  targetPort: string;
  /** Relative target port identifier (1-based) reported in VPD 0x83. */
  relativeTargetPort: number;
}

export interface ScsiCommand {
  cdb: Buffer;
  lun: number;
  nexus: Nexus;
  /** Task attribute (SAM): 0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA. */
  taskAttr: number;
  /** iSCSI Expected Data Transfer Length (bytes the initiator set up to move). */
  expectedDataLength: number;
  /** All data-out the initiator sent (exactly expectedDataLength bytes for a write), or null. */
  dataOut: Buffer | null;
}

export interface ScsiResult {
  status: number;
  /** Bytes for the initiator, already cut to the CDB's allocation length (the transport cuts to EDTL). */
  dataIn?: Buffer;
  /** Sense data (fixed or descriptor format) when status is CHECK CONDITION. */
  sense?: Buffer;
  /** For data-out commands: how many bytes the CDB asked for (the transport reports the residual vs EDTL). */
  dataOutBytesUsed?: number;
}

/** Task management, as the transport asks it of a logical unit. */
export interface LogicalUnit {
  readonly lun: number;
  execute(cmd: ScsiCommand): Promise<ScsiResult>;
  /** LOGICAL UNIT RESET / TARGET WARM RESET: clear non-persistent state, raise unit attentions. */
  reset(by: Nexus): void | Promise<void>;
  /**
   * The nexus is gone (session closed or logging out): drop its RESERVE(6) reservation, pending
   * sense, UAs. Resolves once the reservation's drop is recorded where every peer sees it (never
   * rejects), so a Logout Response can wait for it.
   */
  nexusLost(nexus: Nexus): void | Promise<void>;
}

/** Per-volume identity and settings the logical unit reports. */
export interface LuIdentity {
  /** 16 hex digits (8 bytes) unique and stable for the volume: becomes the NAA 6 id and the serial. */
  volumeId: string;
  volumeName: string;
  vendor: string; // 8 chars
  product: string; // 16 chars
  revision: string; // 4 chars
  readOnly: boolean;
}
