// A SCSI direct-access block device (SPC-4 / SBC-3) over a BlockBackend. One table indexed by
// opcode (and service action) says how to run each command, how a reservation treats it and
// what REPORT SUPPORTED OPERATION CODES reports, so that report never lies. SCSI errors are
// data: a handler returns CHECK CONDITION with sense; it never throws for bad input. Ranges
// are checked for overflow before capacity (`lba + n < lba`).

import { Mutex } from 'async-mutex';
import type { Logger } from 'pino';
import { errorKindOf, ErrorKind } from '../errors';
import { LogLimiter } from '../log';
import { compareAndWriteBlocksMax, transferBytesMax, unmapBlocksMax, unmapDescriptorsMax, writeSameBlocksMax, xcopyChunkBytes, xcopyHeldResultsMax } from '../limits';
import type { BlockBackend } from '../store/types';
import { loneGroup, reportTargetPortGroupsData, RtpgFormat, type TargetPortGroup } from './alua';
import { naaIdentifier, standardInquiry, vpd } from './inquiry';
import { copyAborted, copyStatus, operatingParameters, parse as parseCopyList, XcopyAsc, type CopyOutcome, type Cscd } from './xcopy';
import { applyModePages, modePages, PageControl, type ModeState } from './mode';
import { everyNexus, LocalReservationKeeper, PrOutAction, Reservations, type AccessKind, type ReservationKeeper } from './reservations';
import { Asc, buildSense, failedCommand, SenseKey, type SenseDetail } from './sense';
import { ScsiStatus, type LogicalUnit, type LuIdentity, type Nexus, type ScsiCommand, type ScsiResult } from './types';

export interface BlockLogicalUnitOptions {
  lun: number;
  identity: LuIdentity;
  backend: BlockBackend;
  /** iSCSI target name, reported in VPD 0x83. */
  targetName?: string;
  /** Where reservations live (default: in this object; a peer group shares them through the catalog). */
  reservations?: ReservationKeeper;
  /**
   * EXTENDED COPY: the block backend of another logical unit of the group, by the designator
   * its VPD 0x83 page reports (this LU's own is always known).
   */
  copyTargets?: (designator: Buffer) => BlockBackend | undefined;
  /**
   * The target port groups and their states as this peer knows them now (REPORT TARGET PORT
   * GROUPS, alua.ts); default: the command's own port alone, active/optimized.
   */
  portGroups?: () => readonly TargetPortGroup[];
  log?: Logger;
}

type Handler = (c: Command) => Promise<ScsiResult> | ScsiResult;

interface CommandSpec {
  name: string;
  opcode: number;
  serviceAction?: number;
  cdbBytes: number;
  access: AccessKind;
  run: Handler;
}

/** One command being executed: the CDB plus accessors that produce sense in the LU's format. */
class Command {
  constructor(
    readonly lu: BlockLogicalUnit,
    readonly cmd: ScsiCommand,
  ) {}
  get cdb(): Buffer {
    return this.cmd.cdb;
  }
  fail(d: SenseDetail): ScsiResult {
    return { status: ScsiStatus.checkCondition, sense: buildSense(d, this.lu.mode.descriptorSense) };
  }
  invalidCdb(byte: number, bit?: number): ScsiResult {
    return this.fail({ key: SenseKey.illegalRequest, asc: Asc.invalidFieldInCdb, field: { inCdb: true, byte, bit } });
  }
  invalidParam(byte: number): ScsiResult {
    return this.fail({ key: SenseKey.illegalRequest, asc: Asc.invalidFieldInParameterList, field: { inCdb: false, byte } });
  }
  outOfRange(): ScsiResult {
    return this.fail({ key: SenseKey.illegalRequest, asc: Asc.lbaOutOfRange });
  }
  good(dataIn?: Buffer, allocation?: number): ScsiResult {
    if (dataIn && allocation !== undefined && dataIn.length > allocation) dataIn = dataIn.subarray(0, allocation);
    return { status: ScsiStatus.good, dataIn };
  }
  get nexusKey(): string {
    return nexusKeyOf(this.cmd.nexus);
  }
}

function nexusKeyOf(n: Nexus): string {
  return `${n.initiatorPort}|${n.targetPort}`;
}

const good: ScsiResult = { status: ScsiStatus.good };

/** LBA and block count for the READ/WRITE/VERIFY families by CDB length. */
function lbaAndLength(cdb: Buffer): { lba: number; blocks: number } {
  // The opcode's group code says the CDB length: 0 → 6 bytes, 4 → 16, 5 → 12, else 10.
  const group = cdb[0] >> 5;
  switch (group === 0 ? 6 : group === 4 ? 16 : group === 5 ? 12 : 10) {
    case 6: {
      const blocks = cdb[4] === 0 ? 256 : cdb[4];
      return { lba: ((cdb[1] & 0x1f) << 16) | cdb.readUInt16BE(2), blocks };
    }
    case 12:
      return { lba: cdb.readUInt32BE(2), blocks: cdb.readUInt32BE(6) };
    case 16: {
      const lba = cdb.readBigUInt64BE(2);
      return { lba: lba > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(lba), blocks: cdb.readUInt32BE(10) };
    }
    default:
      return { lba: cdb.readUInt32BE(2), blocks: cdb.readUInt16BE(7) };
  }
}

export class BlockLogicalUnit implements LogicalUnit {
  readonly lun: number;
  readonly mode: ModeState = { descriptorSense: false };
  private readonly identity: LuIdentity;
  private readonly backend: BlockBackend;
  private readonly targetName: string;
  private readonly log: Logger | undefined;
  private readonly keeper: ReservationKeeper;
  /**
   * Pending unit attentions per I_T nexus. Keyed by the session's Nexus object, not its
   * name: a new login from the same initiator port is a new nexus and starts clean.
   */
  private readonly unitAttentions = new Map<Nexus, number[]>();
  private readonly knownNexuses = new Set<Nexus>();
  /** EXTENDED COPY results held for RECEIVE COPY RESULTS, per nexus and list identifier. */
  private readonly copyResults = new Map<Nexus, Map<number, CopyOutcome>>();
  private readonly copyTargets: ((designator: Buffer) => BlockBackend | undefined) | undefined;
  private readonly portGroups: (nexus: Nexus) => readonly TargetPortGroup[];
  /** Failures a host (or a peer down) can cause at will: logged once per kind per window. */
  private readonly failureLog = new LogLimiter();
  /** ORWRITE is read-modify-write: one at a time per logical unit. */
  private readonly orWriteMutex = new Mutex();

  constructor(opts: BlockLogicalUnitOptions) {
    this.lun = opts.lun;
    this.identity = opts.identity;
    this.backend = opts.backend;
    this.targetName = opts.targetName ?? `iqn.2026-11.io.peersan:${opts.identity.volumeName}`;
    this.log = opts.log;
    this.copyTargets = opts.copyTargets;
    this.portGroups = opts.portGroups ?? ((nexus) => loneGroup(nexus.relativeTargetPort));
    this.keeper = opts.reservations ?? new LocalReservationKeeper();
    this.keeper.attach((nexusKey, asc) => {
      for (const n of this.knownNexuses) if (nexusKey === everyNexus || nexusKeyOf(n) === nexusKey) this.postUnitAttention(n, asc);
    });
  }

  private get reservations(): Reservations {
    return this.keeper.current;
  }

  async execute(cmd: ScsiCommand): Promise<ScsiResult> {
    const c = new Command(this, cmd);
    const op = cmd.cdb[0];
    const spec = commandFor(cmd.cdb);
    const nexusKey = c.nexusKey;
    this.knownNexuses.add(cmd.nexus);
    if (!spec) {
      return c.fail({ key: SenseKey.illegalRequest, asc: tableHasOpcode(op) ? Asc.invalidFieldInCdb : Asc.invalidCommandOperationCode, field: tableHasOpcode(op) ? { inCdb: true, byte: 1 } : { inCdb: true, byte: 0 } });
    }
    if (cmd.cdb.length < spec.cdbBytes) return c.invalidCdb(0);
    // Unit attentions go to the first command of the nexus except INQUIRY, REPORT LUNS, REQUEST SENSE.
    if (op !== 0x12 && op !== 0xa0 && op !== 0x03) {
      const ua = this.popUnitAttention(cmd.nexus);
      if (ua !== undefined) return c.fail({ key: SenseKey.unitAttention, asc: ua });
    }
    // The control byte's NACA bit asks for ACA, which we do not support.
    if ((cmd.cdb[spec.cdbBytes - 1] & 0x04) !== 0) return c.invalidCdb(spec.cdbBytes - 1, 2);
    const legacy = op === 0x16 || op === 0x17 || op === 0x56 || op === 0x57;
    if (!this.reservations.allows(nexusKey, spec.access, legacy)) return { status: ScsiStatus.reservationConflict };
    try {
      return await spec.run(c);
    } catch (err) {
      return this.failed(err, op, spec.access === 'write');
    }
  }

  /**
   * A store or routing error as sense data (sense.ts senseForKind): the session's own
   * fallback (HARDWARE ERROR for a rejected promise) is then reached only by real bugs.
   */
  private failed(err: unknown, op: number, writing: boolean): ScsiResult {
    const kind = errorKindOf(err, writing);
    if (kind === ErrorKind.other) this.log?.error({ err, op }, 'command failed in the backend');
    else if (this.log) this.failureLog.warn(this.log, `${op}:${kind}`, { op, kind, reason: err instanceof Error ? err.message : String(err) }, 'command failed');
    return failedCommand(kind, this.mode.descriptorSense);
  }

  /** LOGICAL UNIT RESET: every nexus, through whichever peer, hears about it before the TMF completes. */
  async reset(by: Nexus): Promise<void> {
    this.mode.descriptorSense = false;
    this.knownNexuses.add(by);
    if (this.reservations.hasLegacyReservation()) await this.keeper.change((r) => r.resetLegacy());
    await this.keeper.announce([[everyNexus, Asc.busDeviceResetOccurred]]);
  }

  nexusLost(nexus: Nexus): Promise<void> {
    const key = nexusKeyOf(nexus);
    this.unitAttentions.delete(nexus);
    this.copyResults.delete(nexus);
    this.knownNexuses.delete(nexus);
    return this.reservations.hasLegacyReservation() ? this.changeInBackground((r) => r.resetLegacy(key)) : Promise.resolve();
  }

  /** The volume was resized: every nexus hears CAPACITY DATA HAS CHANGED once. */
  capacityChanged(): void {
    for (const n of this.knownNexuses) this.postUnitAttention(n, Asc.capacityDataChanged);
  }

  /**
   * A target port group changed state (implicit ALUA): every nexus of this logical unit on this
   * peer hears ASYMMETRIC ACCESS STATE CHANGED once and reads the new states with REPORT TARGET
   * PORT GROUPS.
   */
  accessStatesChanged(): void {
    for (const n of this.knownNexuses) this.postUnitAttention(n, Asc.asymmetricAccessStateChanged);
  }

  /** Task management cannot wait for the catalog: the change is made behind it (the promise says when it is done; it never rejects). */
  private changeInBackground(fn: (r: Reservations) => void): Promise<void> {
    return this.keeper.change(fn).then(() => undefined, (err) => this.log?.error({ err }, 'dropping an SPC-2 reservation failed'));
  }

  postUnitAttention(nexus: Nexus, asc: number): void {
    const list = this.unitAttentions.get(nexus) ?? [];
    if (!list.includes(asc) && list.length < 16) list.push(asc);
    this.unitAttentions.set(nexus, list);
  }

  private popUnitAttention(nexus: Nexus): number | undefined {
    const list = this.unitAttentions.get(nexus);
    if (!list || list.length === 0) return undefined;
    return list.shift();
  }

  // ---- range and data helpers ----------------------------------------------------------

  get blockBytes(): number {
    return this.backend.blockBytes;
  }

  /** undefined when [lba, lba+blocks) is inside the volume, else the LBA OUT OF RANGE result. */
  checkRange(c: Command, lba: number, blocks: number): ScsiResult | undefined {
    if (lba + blocks < lba || lba > this.backend.blockCount || lba + blocks > this.backend.blockCount) return c.outOfRange();
    return undefined;
  }

  /** Data-out for `blocks` blocks; undefined when the initiator sent too little. */
  dataFor(c: Command, blocks: number): Buffer | undefined {
    const need = blocks * this.backend.blockBytes;
    const data = c.cmd.dataOut;
    if (!data || data.length < need) return undefined;
    return data.length === need ? data : data.subarray(0, need);
  }

  // ---- command handlers ------------------------------------------------------------------

  inquiry = (c: Command): ScsiResult => {
    const evpd = (c.cdb[1] & 0x01) !== 0;
    const page = c.cdb[2];
    const allocation = c.cdb.readUInt16BE(3);
    if (c.cdb[1] & 0x02) return c.invalidCdb(1, 1); // CmdDt is obsolete
    if (!evpd) {
      if (page !== 0) return c.invalidCdb(2);
      return c.good(standardInquiry(this.identity), allocation);
    }
    const data = vpd(page, this.identity, c.cmd.nexus, this.targetName, { grainBlocks: this.backend.grainBlocks, blockBytes: this.backend.blockBytes });
    if (!data) return c.invalidCdb(2);
    return c.good(data, allocation);
  };

  readCapacity10 = (c: Command): ScsiResult => {
    const d = Buffer.alloc(8);
    const last = this.backend.blockCount - 1;
    d.writeUInt32BE(last > 0xfffffffe ? 0xffffffff : last, 0);
    d.writeUInt32BE(this.backend.blockBytes, 4);
    return c.good(d);
  };

  readCapacity16 = (c: Command): ScsiResult => {
    const d = Buffer.alloc(32);
    d.writeBigUInt64BE(BigInt(this.backend.blockCount - 1), 0);
    d.writeUInt32BE(this.backend.blockBytes, 8);
    d[14] = 0x80 | 0x40; // LBPME, LBPRZ
    return c.good(d, c.cdb.readUInt32BE(10));
  };

  read = async (c: Command): Promise<ScsiResult> => {
    if (c.cdb[1] & 0xe0) return c.invalidCdb(1, 5); // RDPROTECT: no protection information
    const { lba, blocks } = lbaAndLength(c.cdb);
    const bad = this.checkRange(c, lba, blocks);
    if (bad) return bad;
    if (blocks === 0) return good;
    if (blocks * this.backend.blockBytes > transferBytesMax) return c.invalidCdb(c.cdb.length >= 16 ? 10 : 7);
    return { status: ScsiStatus.good, dataIn: await this.backend.read(lba, blocks) };
  };

  write = async (c: Command): Promise<ScsiResult> => {
    if (c.cdb[0] !== 0x0a && c.cdb[1] & 0xe0) return c.invalidCdb(1, 5); // WRPROTECT
    const { lba, blocks } = lbaAndLength(c.cdb);
    const bad = this.checkRange(c, lba, blocks);
    if (bad) return bad;
    if (this.identity.readOnly) return c.fail({ key: SenseKey.dataProtect, asc: Asc.writeProtected });
    const bytes = blocks * this.backend.blockBytes;
    if (blocks === 0) return { status: ScsiStatus.good, dataOutBytesUsed: 0 };
    if (bytes > transferBytesMax) return c.invalidCdb(c.cdb.length >= 16 ? 10 : 7);
    // iSCSI EDTL shorter than the CDB: only the whole blocks that arrived are written; the
    // transport reports the rest as residual overflow (what libiscsi's residual tests expect).
    const arrivedBlocks = Math.min(blocks, Math.floor((c.cmd.dataOut?.length ?? 0) / this.backend.blockBytes));
    if (arrivedBlocks === 0) return { status: ScsiStatus.good, dataOutBytesUsed: bytes };
    const data = this.dataFor(c, arrivedBlocks)!;
    const fua = c.cdb[0] !== 0x0a && (c.cdb[1] & 0x08) !== 0;
    // WRITE AND VERIFY: the write is verified by reading back what the store acknowledged.
    const verify = c.cdb[0] === 0x2e || c.cdb[0] === 0xae || c.cdb[0] === 0x8e;
    await this.backend.write(lba, data, { fua: fua || verify });
    return { status: ScsiStatus.good, dataOutBytesUsed: bytes };
  };

  orWrite = async (c: Command): Promise<ScsiResult> => {
    if (c.cdb[1] & 0xe0) return c.invalidCdb(1, 5); // ORPROTECT
    const { lba, blocks } = lbaAndLength(c.cdb);
    const bad = this.checkRange(c, lba, blocks);
    if (bad) return bad;
    if (blocks === 0) return { status: ScsiStatus.good, dataOutBytesUsed: 0 };
    if (this.identity.readOnly) return c.fail({ key: SenseKey.dataProtect, asc: Asc.writeProtected });
    const bytes = blocks * this.backend.blockBytes;
    if (bytes > transferBytesMax) return c.invalidCdb(10);
    const mask = this.dataFor(c, blocks);
    if (!mask) return { ...c.invalidCdb(10), dataOutBytesUsed: bytes };
    const fua = (c.cdb[1] & 0x08) !== 0;
    await this.orWriteMutex.runExclusive(async () => {
      const current = await this.backend.read(lba, blocks);
      for (let i = 0; i < current.length; i++) current[i] |= mask[i];
      await this.backend.write(lba, current, { fua });
    });
    return { status: ScsiStatus.good, dataOutBytesUsed: bytes };
  };

  verify = async (c: Command): Promise<ScsiResult> => {
    if (c.cdb[1] & 0xe0) return c.invalidCdb(1, 5);
    const bytchk = (c.cdb[1] >> 1) & 0x03;
    const { lba, blocks } = lbaAndLength(c.cdb);
    const bad = this.checkRange(c, lba, blocks);
    if (bad) return bad;
    if (bytchk === 0 || blocks === 0) return { status: ScsiStatus.good, dataOutBytesUsed: 0 };
    if (bytchk !== 1) return c.invalidCdb(1, 1);
    const expected = this.dataFor(c, blocks);
    const bytes = blocks * this.backend.blockBytes;
    if (!expected) return { ...c.invalidCdb(c.cdb.length >= 16 ? 10 : 7), dataOutBytesUsed: bytes };
    const actual = await this.backend.read(lba, blocks);
    const offset = firstDifference(actual, expected);
    if (offset >= 0) return { ...c.fail({ key: SenseKey.miscompare, asc: Asc.miscompareDuringVerify, information: offset }), dataOutBytesUsed: bytes };
    return { status: ScsiStatus.good, dataOutBytesUsed: bytes };
  };

  writeSame = async (c: Command): Promise<ScsiResult> => {
    const sixteen = c.cdb[0] === 0x93;
    const flags = c.cdb[1];
    const anchor = (flags & 0x10) !== 0;
    const unmap = (flags & 0x08) !== 0;
    const ndob = sixteen && (flags & 0x01) !== 0;
    if (flags & 0xe0) return c.invalidCdb(1, 5);
    if (!sixteen && (flags & 0x01)) return c.invalidCdb(1, 0);
    if (anchor) return c.invalidCdb(1, 4);
    if (ndob && !unmap) return c.invalidCdb(1, 0);
    const lba = sixteen ? Number(c.cdb.readBigUInt64BE(2) > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : c.cdb.readBigUInt64BE(2)) : c.cdb.readUInt32BE(2);
    const blocks = sixteen ? c.cdb.readUInt32BE(10) : c.cdb.readUInt16BE(7);
    if (blocks === 0) return c.invalidCdb(sixteen ? 10 : 7); // WSNZ=1
    if (blocks > writeSameBlocksMax) return c.invalidCdb(sixteen ? 10 : 7);
    const bad = this.checkRange(c, lba, blocks);
    if (bad) return bad;
    if (this.identity.readOnly) return c.fail({ key: SenseKey.dataProtect, asc: Asc.writeProtected });
    const bs = this.backend.blockBytes;
    const pattern = ndob ? Buffer.alloc(bs) : this.dataFor(c, 1);
    if (!pattern) return c.invalidCdb(sixteen ? 10 : 7);
    const used = ndob ? 0 : bs;
    // LBPRZ=1: unmapped blocks read as zeros, so UNMAP with a zero pattern is the same write.
    if (isZero(pattern)) {
      await this.backend.unmap(lba, blocks);
      return { status: ScsiStatus.good, dataOutBytesUsed: used };
    }
    const chunkBlocks = Math.max(1, Math.floor((1024 * 1024) / bs));
    const chunk = Buffer.alloc(Math.min(blocks, chunkBlocks) * bs);
    for (let off = 0; off < chunk.length; off += bs) pattern.copy(chunk, off);
    for (let done = 0; done < blocks; done += chunkBlocks) {
      const n = Math.min(chunkBlocks, blocks - done);
      await this.backend.write(lba + done, n === chunkBlocks ? chunk : chunk.subarray(0, n * bs));
    }
    return { status: ScsiStatus.good, dataOutBytesUsed: used };
  };

  unmap = async (c: Command): Promise<ScsiResult> => {
    if (c.cdb[1] & 0x01) return c.invalidCdb(1, 0); // ANCHOR: not supported (ANC_SUP=0)
    const listBytes = c.cdb.readUInt16BE(7);
    if (listBytes === 0) return good;
    if (this.identity.readOnly) return c.fail({ key: SenseKey.dataProtect, asc: Asc.writeProtected });
    const data = c.cmd.dataOut;
    if (listBytes < 8 || !data || data.length < 8) return c.fail({ key: SenseKey.illegalRequest, asc: Asc.parameterListLengthError });
    const list = data.subarray(0, Math.min(listBytes, data.length));
    const descBytes = Math.min(list.readUInt16BE(2), list.length - 8);
    const count = Math.floor(descBytes / 16);
    if (count > unmapDescriptorsMax) return c.invalidParam(2);
    const extents: Array<[number, number]> = [];
    for (let i = 0; i < count; i++) {
      const off = 8 + 16 * i;
      const lba64 = list.readBigUInt64BE(off);
      const blocks = list.readUInt32BE(off + 8);
      if (blocks > unmapBlocksMax) return c.invalidParam(off + 8);
      const lba = lba64 > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(lba64);
      const bad = this.checkRange(c, lba, blocks);
      if (bad) return bad;
      if (blocks > 0) extents.push([lba, blocks]);
    }
    for (const [lba, blocks] of extents) await this.backend.unmap(lba, blocks);
    return { status: ScsiStatus.good, dataOutBytesUsed: listBytes };
  };

  getLbaStatus = async (c: Command): Promise<ScsiResult> => {
    const lba64 = c.cdb.readBigUInt64BE(2);
    const allocation = c.cdb.readUInt32BE(10);
    if (lba64 >= BigInt(this.backend.blockCount)) return c.outOfRange();
    const lba = Number(lba64);
    if (allocation < 24) return c.good(Buffer.alloc(0));
    const maxDescriptors = Math.min(256, Math.floor((allocation - 8) / 16));
    const extents = await this.backend.lbaStatus(lba, Math.min(this.backend.blockCount - lba, 1024 * 1024 * 64));
    const list = extents.slice(0, maxDescriptors);
    const d = Buffer.alloc(8 + 16 * list.length);
    d.writeUInt32BE(4 + 16 * list.length, 0);
    list.forEach((e, i) => {
      const off = 8 + 16 * i;
      d.writeBigUInt64BE(BigInt(e.lba), off);
      d.writeUInt32BE(e.blocks, off + 8);
      d[off + 12] = e.mapped ? 0 : 1;
    });
    return c.good(d, allocation);
  };

  compareAndWrite = async (c: Command): Promise<ScsiResult> => {
    if (c.cdb[1] & 0xe0) return c.invalidCdb(1, 5);
    const lba64 = c.cdb.readBigUInt64BE(2);
    const blocks = c.cdb[13];
    const lba = lba64 > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(lba64);
    if (blocks > compareAndWriteBlocksMax) return c.invalidCdb(13);
    const bad = this.checkRange(c, lba, blocks);
    if (bad) return bad;
    if (blocks === 0 && !c.cmd.dataOut?.length) return { status: ScsiStatus.good, dataOutBytesUsed: 0 };
    if (this.identity.readOnly) return c.fail({ key: SenseKey.dataProtect, asc: Asc.writeProtected });
    const bytes = 2 * blocks * this.backend.blockBytes;
    // The data-out must be exactly the compare and the write halves.
    if ((c.cmd.dataOut?.length ?? 0) !== bytes) return { ...c.invalidCdb(13), dataOutBytesUsed: bytes };
    const both = c.cmd.dataOut!;
    const half = blocks * this.backend.blockBytes;
    const fua = (c.cdb[1] & 0x08) !== 0;
    const result = await this.backend.compareAndWrite(lba, both.subarray(0, half), both.subarray(half), { fua });
    if (!result.ok) {
      return { ...c.fail({ key: SenseKey.miscompare, asc: Asc.miscompareDuringVerify, information: result.miscompareOffsetBytes }), dataOutBytesUsed: bytes };
    }
    return { status: ScsiStatus.good, dataOutBytesUsed: bytes };
  };

  synchronizeCache = async (c: Command): Promise<ScsiResult> => {
    const sixteen = c.cdb[0] === 0x91;
    const lba = sixteen ? Number(c.cdb.readBigUInt64BE(2) > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : c.cdb.readBigUInt64BE(2)) : c.cdb.readUInt32BE(2);
    const blocks = sixteen ? c.cdb.readUInt32BE(10) : c.cdb.readUInt16BE(7);
    const bad = this.checkRange(c, lba, blocks);
    if (bad) return bad;
    await this.backend.flush();
    return good;
  };

  preFetch = (c: Command): ScsiResult => {
    const sixteen = c.cdb[0] === 0x90;
    const lba = sixteen ? Number(c.cdb.readBigUInt64BE(2) > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : c.cdb.readBigUInt64BE(2)) : c.cdb.readUInt32BE(2);
    const blocks = sixteen ? c.cdb.readUInt32BE(10) : c.cdb.readUInt16BE(7);
    const bad = this.checkRange(c, lba, blocks);
    if (bad) return bad;
    // We keep no cache of our own to fill (the OS page cache does that): nothing to prefetch.
    return good;
  };

  modeSense = (c: Command): ScsiResult => {
    const ten = c.cdb[0] === 0x5a;
    const dbd = (c.cdb[1] & 0x08) !== 0;
    const llbaa = ten && (c.cdb[1] & 0x10) !== 0;
    const pc = c.cdb[2] >> 6;
    const code = c.cdb[2] & 0x3f;
    const subpage = c.cdb[3];
    const allocation = ten ? c.cdb.readUInt16BE(7) : c.cdb[4];
    if (pc === PageControl.saved) return c.fail({ key: SenseKey.illegalRequest, asc: Asc.savingParametersNotSupported });
    const pages = modePages(code, subpage, pc, this.mode);
    if (!pages) return c.invalidCdb(2, code === 0x3f ? undefined : 5);
    const blockDescriptor = dbd ? Buffer.alloc(0) : this.blockDescriptor(llbaa);
    const deviceSpecific = (this.identity.readOnly ? 0x80 : 0) | 0x10; // WP, DPOFUA
    let header: Buffer;
    if (ten) {
      header = Buffer.alloc(8);
      header.writeUInt16BE(6 + blockDescriptor.length + pages.length, 0);
      header[3] = deviceSpecific;
      header[4] = llbaa && !dbd ? 0x01 : 0;
      header.writeUInt16BE(blockDescriptor.length, 6);
    } else {
      header = Buffer.alloc(4);
      header[0] = Math.min(255, 3 + blockDescriptor.length + pages.length);
      header[2] = deviceSpecific;
      header[3] = blockDescriptor.length;
    }
    return c.good(Buffer.concat([header, blockDescriptor, pages]), allocation);
  };

  private blockDescriptor(long: boolean): Buffer {
    if (long) {
      const d = Buffer.alloc(16);
      d.writeBigUInt64BE(BigInt(this.backend.blockCount), 0);
      d.writeUInt32BE(this.backend.blockBytes, 12);
      return d;
    }
    const d = Buffer.alloc(8);
    d.writeUInt32BE(this.backend.blockCount > 0xffffffff ? 0xffffffff : this.backend.blockCount, 0);
    d.writeUInt32BE(this.backend.blockBytes & 0xffffff, 4);
    return d;
  }

  modeSelect = (c: Command): ScsiResult => {
    const ten = c.cdb[0] === 0x55;
    if ((c.cdb[1] & 0x10) === 0) return c.invalidCdb(1, 4); // PF must be set: we only take page format
    if (c.cdb[1] & 0x01) return c.fail({ key: SenseKey.illegalRequest, asc: Asc.savingParametersNotSupported });
    const listBytes = ten ? c.cdb.readUInt16BE(7) : c.cdb[4];
    if (listBytes === 0) return good;
    const data = c.cmd.dataOut;
    const headerBytes = ten ? 8 : 4;
    if (!data || data.length < Math.min(listBytes, headerBytes) || listBytes < headerBytes) {
      return c.fail({ key: SenseKey.illegalRequest, asc: Asc.parameterListLengthError });
    }
    const list = data.subarray(0, listBytes);
    const bdBytes = ten ? list.readUInt16BE(6) : list[3];
    const pagesStart = headerBytes + bdBytes;
    if (pagesStart > list.length) return c.fail({ key: SenseKey.illegalRequest, asc: Asc.parameterListLengthError });
    const { badOffset, changed } = applyModePages(list.subarray(pagesStart), this.mode);
    if (badOffset >= 0) return { ...c.invalidParam(pagesStart + badOffset), dataOutBytesUsed: listBytes };
    if (changed) {
      for (const n of this.knownNexuses) if (n !== c.cmd.nexus) this.postUnitAttention(n, Asc.modeParametersChanged);
    }
    return { status: ScsiStatus.good, dataOutBytesUsed: listBytes };
  };

  reportLuns = (c: Command): ScsiResult => {
    const select = c.cdb[2];
    const allocation = c.cdb.readUInt32BE(6);
    if (select > 2) return c.invalidCdb(2);
    if (allocation < 16) return c.invalidCdb(6);
    const d = Buffer.alloc(16);
    d.writeUInt32BE(8, 0);
    d.writeUInt16BE(this.lun & 0x3fff, 8);
    return c.good(d, allocation);
  };

  requestSense = (c: Command): ScsiResult => {
    const desc = (c.cdb[1] & 0x01) !== 0;
    const allocation = c.cdb[4];
    const ua = this.popUnitAttention(c.cmd.nexus);
    const sense = buildSense({ key: ua !== undefined ? SenseKey.unitAttention : SenseKey.noSense, asc: ua ?? Asc.noAdditionalSense }, desc);
    return c.good(sense, allocation);
  };

  testUnitReady = (): ScsiResult => good;

  startStopUnit = (c: Command): ScsiResult => {
    const loej = (c.cdb[4] & 0x02) !== 0;
    const powerCondition = c.cdb[4] >> 4;
    if (loej && powerCondition === 0) return c.invalidCdb(4, 1); // not a removable medium
    return good;
  };

  reserve = async (c: Command): Promise<ScsiResult> => {
    if (c.cdb[0] === 0x56 && c.cdb[1] & 0x02) return c.invalidCdb(1, 1); // third-party reservation
    const key = c.nexusKey;
    return (await this.keeper.change((r) => r.legacyReserve(key))) ? good : { status: ScsiStatus.reservationConflict };
  };

  release = async (c: Command): Promise<ScsiResult> => {
    const key = c.nexusKey;
    await this.keeper.change((r) => r.legacyRelease(key));
    return good;
  };

  persistentReserveIn = (c: Command): ScsiResult => {
    if (this.reservations.hasLegacyReservation()) return { status: ScsiStatus.reservationConflict };
    const action = c.cdb[1] & 0x1f;
    const allocation = c.cdb.readUInt16BE(7);
    switch (action) {
      case 0:
        return c.good(this.reservations.readKeys(), allocation);
      case 1:
        return c.good(this.reservations.readReservation(), allocation);
      case 2:
        return c.good(Reservations.reportCapabilities(), allocation);
      case 3:
        return c.good(this.reservations.readFullStatus(), allocation);
      default:
        return c.invalidCdb(1);
    }
  };

  persistentReserveOut = async (c: Command): Promise<ScsiResult> => {
    const action = c.cdb[1] & 0x1f;
    const listBytes = c.cdb.readUInt32BE(5);
    if (action > PrOutAction.registerAndMove) return c.invalidCdb(1);
    if (action === PrOutAction.registerAndMove) return c.invalidCdb(1);
    if (listBytes !== 24) return c.fail({ key: SenseKey.illegalRequest, asc: Asc.parameterListLengthError });
    const data = c.cmd.dataOut;
    if (!data || data.length < 24) return c.fail({ key: SenseKey.illegalRequest, asc: Asc.parameterListLengthError });
    const n = c.cmd.nexus;
    const key = c.nexusKey;
    const params = {
      action,
      scope: c.cdb[2] >> 4,
      type: c.cdb[2] & 0x0f,
      key: data.readBigUInt64BE(0),
      serviceActionKey: data.readBigUInt64BE(8),
      specIPt: (data[20] & 0x08) !== 0,
      allTgPt: (data[20] & 0x04) !== 0,
      aptpl: (data[20] & 0x01) !== 0,
    };
    const verdict = await this.keeper.change((r) => r.out(key, n.initiatorPort, n.relativeTargetPort, params));
    if (verdict.ok) return { status: ScsiStatus.good, dataOutBytesUsed: 24 };
    if (verdict.conflict) return { status: ScsiStatus.reservationConflict, dataOutBytesUsed: 24 };
    return { ...c.fail({ key: SenseKey.illegalRequest, asc: verdict.asc, field: verdict.field }), dataOutBytesUsed: 24 };
  };

  reportSupportedOpcodes = (c: Command): ScsiResult => {
    const rctd = (c.cdb[2] & 0x80) !== 0;
    const options = c.cdb[2] & 0x07;
    const requestedOp = c.cdb[3];
    const requestedSa = c.cdb.readUInt16BE(4);
    const allocation = c.cdb.readUInt32BE(6);
    if (options === 0) return c.good(allCommandsDescriptor(rctd), allocation);
    if (options > 3) return c.invalidCdb(2);
    const matching = table.filter((s) => s.opcode === requestedOp);
    const hasSa = matching.some((s) => s.serviceAction !== undefined);
    if (options === 1 && hasSa) return c.invalidCdb(2);
    if (options === 2 && matching.length > 0 && !hasSa) return c.invalidCdb(2);
    const spec = options === 1 || (options === 3 && !hasSa) ? matching.find((s) => s.serviceAction === undefined) : matching.find((s) => s.serviceAction === requestedSa);
    const usage = spec ? cdbUsage(spec) : Buffer.alloc(0);
    const d = Buffer.alloc(4 + usage.length + (rctd && spec ? 12 : 0));
    d[1] = (spec ? 0x03 : 0x01) | (rctd && spec ? 0x80 : 0);
    d.writeUInt16BE(usage.length, 2);
    usage.copy(d, 4);
    if (rctd && spec) d.writeUInt16BE(0x0a, 4 + usage.length);
    return c.good(d, allocation);
  };

  // ---- EXTENDED COPY (LID1) and RECEIVE COPY RESULTS ----------------------------------------

  extendedCopy = async (c: Command): Promise<ScsiResult> => {
    const listBytes = c.cdb.readUInt32BE(10);
    const parsed = parseCopyList(c.cmd.dataOut ?? Buffer.alloc(0), listBytes);
    if (!parsed.ok) return { ...c.fail(parsed.error), dataOutBytesUsed: listBytes };
    const list = parsed.list;
    if (!list) return good;
    const outcome: CopyOutcome = { listId: list.listId, ok: false, segmentsProcessed: 0, bytesCopied: 0 };
    const finish = (error?: number): ScsiResult => {
      outcome.ok = error === undefined;
      if (list.listIdUsage === 0) this.holdCopyResult(c.cmd.nexus, outcome);
      return error === undefined ? { status: ScsiStatus.good, dataOutBytesUsed: listBytes } : { ...c.fail(copyAborted(error)), dataOutBytesUsed: listBytes };
    };
    for (const segment of list.segments) {
      const source = this.copyTarget(list.cscds[segment.sourceIndex]);
      const destination = this.copyTarget(list.cscds[segment.destinationIndex]);
      if (!source || !destination) return finish(XcopyAsc.unreachableCopyTarget);
      const inRange = (b: BlockBackend, lba: number): boolean => lba + segment.blocks >= lba && lba + segment.blocks <= b.blockCount;
      if (!inRange(source, segment.sourceLba) || !inRange(destination, segment.destinationLba) || source.blockBytes !== destination.blockBytes) {
        return finish(Asc.noAdditionalSense);
      }
      outcome.bytesCopied += await copyBlocks(source, segment.sourceLba, destination, segment.destinationLba, segment.blocks);
      outcome.segmentsProcessed++;
    }
    return finish();
  };

  /** The backend a CSCD descriptor names: this LU by its NAA designator, or another through copyTargets. */
  private copyTarget(cscd: Cscd | undefined): BlockBackend | undefined {
    if (!cscd || cscd.nul) return undefined;
    const backend = cscd.designator.equals(naaIdentifier(this.identity.volumeId)) ? this.backend : this.copyTargets?.(cscd.designator);
    if (backend && cscd.blockBytes !== 0 && cscd.blockBytes !== backend.blockBytes) return undefined;
    return backend;
  }

  private holdCopyResult(nexus: Nexus, outcome: CopyOutcome): void {
    const held = this.copyResults.get(nexus) ?? new Map<number, CopyOutcome>();
    held.delete(outcome.listId);
    if (held.size >= xcopyHeldResultsMax) held.delete(held.keys().next().value!);
    held.set(outcome.listId, outcome);
    this.copyResults.set(nexus, held);
  }

  receiveCopyResults = (c: Command): ScsiResult => {
    const allocation = c.cdb.readUInt32BE(10);
    if ((c.cdb[1] & 0x1f) === 0x03) return c.good(operatingParameters(), allocation);
    const outcome = this.copyResults.get(c.cmd.nexus)?.get(c.cdb[2]);
    if (!outcome) return c.invalidCdb(2);
    return c.good(copyStatus(outcome), allocation);
  };

  reportTargetPortGroups = (c: Command): ScsiResult => {
    const format = c.cdb[1] >> 5;
    if (format !== RtpgFormat.lengthOnly && format !== RtpgFormat.extended) return c.invalidCdb(1, 5);
    return c.good(reportTargetPortGroupsData(this.portGroups(c.cmd.nexus), format), c.cdb.readUInt32BE(6));
  };

  reportSupportedTmf = (c: Command): ScsiResult => {
    const d = Buffer.alloc(4);
    d[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02; // ATS, ATSS, LURS, TARS (warm), plus CTSS
    return c.good(d, c.cdb.readUInt32BE(6));
  };
}

/** Copy blocks between backends (possibly the same one) in bounded chunks; returns bytes moved. */
async function copyBlocks(source: BlockBackend, sourceLba: number, destination: BlockBackend, destinationLba: number, blocks: number): Promise<number> {
  const chunkBlocks = Math.max(1, Math.floor(xcopyChunkBytes / source.blockBytes));
  for (let done = 0; done < blocks; done += chunkBlocks) {
    const n = Math.min(chunkBlocks, blocks - done);
    await destination.write(destinationLba + done, await source.read(sourceLba + done, n));
  }
  return blocks * source.blockBytes;
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

// ---- the command table ------------------------------------------------------------------

type LuMethod = keyof BlockLogicalUnit;
const spec = (name: string, opcode: number, cdbBytes: number, access: AccessKind, method: LuMethod, serviceAction?: number): CommandSpec => ({
  name, opcode, cdbBytes, access, serviceAction,
  run: (c) => (c.lu[method] as unknown as Handler)(c),
});

const table: CommandSpec[] = [
  spec('TEST UNIT READY', 0x00, 6, 'always', 'testUnitReady'),
  spec('REQUEST SENSE', 0x03, 6, 'always', 'requestSense'),
  spec('READ(6)', 0x08, 6, 'read', 'read'),
  spec('WRITE(6)', 0x0a, 6, 'write', 'write'),
  spec('INQUIRY', 0x12, 6, 'always', 'inquiry'),
  spec('MODE SELECT(6)', 0x15, 6, 'write', 'modeSelect'),
  spec('RESERVE(6)', 0x16, 6, 'write', 'reserve'),
  spec('RELEASE(6)', 0x17, 6, 'always', 'release'),
  spec('MODE SENSE(6)', 0x1a, 6, 'read', 'modeSense'),
  spec('START STOP UNIT', 0x1b, 6, 'write', 'startStopUnit'),
  spec('READ CAPACITY(10)', 0x25, 10, 'always', 'readCapacity10'),
  spec('READ(10)', 0x28, 10, 'read', 'read'),
  spec('WRITE(10)', 0x2a, 10, 'write', 'write'),
  spec('WRITE AND VERIFY(10)', 0x2e, 10, 'write', 'write'),
  spec('VERIFY(10)', 0x2f, 10, 'read', 'verify'),
  spec('PRE-FETCH(10)', 0x34, 10, 'read', 'preFetch'),
  spec('SYNCHRONIZE CACHE(10)', 0x35, 10, 'write', 'synchronizeCache'),
  spec('WRITE SAME(10)', 0x41, 10, 'write', 'writeSame'),
  spec('UNMAP', 0x42, 10, 'write', 'unmap'),
  spec('MODE SELECT(10)', 0x55, 10, 'write', 'modeSelect'),
  spec('RESERVE(10)', 0x56, 10, 'write', 'reserve'),
  spec('RELEASE(10)', 0x57, 10, 'always', 'release'),
  spec('MODE SENSE(10)', 0x5a, 10, 'read', 'modeSense'),
  spec('PERSISTENT RESERVE IN', 0x5e, 10, 'always', 'persistentReserveIn'),
  spec('PERSISTENT RESERVE OUT', 0x5f, 10, 'always', 'persistentReserveOut'),
  spec('COMPARE AND WRITE', 0x89, 16, 'write', 'compareAndWrite'),
  spec('ORWRITE(16)', 0x8b, 16, 'write', 'orWrite'),
  spec('EXTENDED COPY(LID1)', 0x83, 16, 'write', 'extendedCopy', 0x00),
  spec('RECEIVE COPY RESULTS (COPY STATUS)', 0x84, 16, 'read', 'receiveCopyResults', 0x00),
  spec('RECEIVE COPY RESULTS (OPERATING PARAMETERS)', 0x84, 16, 'read', 'receiveCopyResults', 0x03),
  spec('READ(16)', 0x88, 16, 'read', 'read'),
  spec('WRITE(16)', 0x8a, 16, 'write', 'write'),
  spec('WRITE AND VERIFY(16)', 0x8e, 16, 'write', 'write'),
  spec('VERIFY(16)', 0x8f, 16, 'read', 'verify'),
  spec('PRE-FETCH(16)', 0x90, 16, 'read', 'preFetch'),
  spec('SYNCHRONIZE CACHE(16)', 0x91, 16, 'write', 'synchronizeCache'),
  spec('WRITE SAME(16)', 0x93, 16, 'write', 'writeSame'),
  spec('READ CAPACITY(16)', 0x9e, 16, 'always', 'readCapacity16', 0x10),
  spec('GET LBA STATUS', 0x9e, 16, 'read', 'getLbaStatus', 0x12),
  spec('REPORT LUNS', 0xa0, 12, 'always', 'reportLuns'),
  spec('REPORT TARGET PORT GROUPS', 0xa3, 12, 'always', 'reportTargetPortGroups', 0x0a),
  spec('REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS', 0xa3, 12, 'always', 'reportSupportedTmf', 0x0d),
  spec('REPORT SUPPORTED OPERATION CODES', 0xa3, 12, 'always', 'reportSupportedOpcodes', 0x0c),
  spec('READ(12)', 0xa8, 12, 'read', 'read'),
  spec('WRITE(12)', 0xaa, 12, 'write', 'write'),
  spec('WRITE AND VERIFY(12)', 0xae, 12, 'write', 'write'),
  spec('VERIFY(12)', 0xaf, 12, 'read', 'verify'),
];

const byOpcode = new Map<number, CommandSpec[]>();
for (const s of table) byOpcode.set(s.opcode, [...(byOpcode.get(s.opcode) ?? []), s]);

function tableHasOpcode(op: number): boolean {
  return byOpcode.has(op);
}

function commandFor(cdb: Buffer): CommandSpec | undefined {
  const specs = byOpcode.get(cdb[0]);
  if (!specs) return undefined;
  if (specs.length === 1 && specs[0].serviceAction === undefined) return specs[0];
  const sa = cdb[1] & 0x1f;
  return specs.find((s) => s.serviceAction === sa);
}

/** The CDB usage bitmap (SPC-4 6.35.3): which bits of each CDB byte the command looks at. */
function cdbUsage(s: CommandSpec): Buffer {
  const u = Buffer.alloc(s.cdbBytes, 0xff);
  u[0] = s.opcode;
  if (s.serviceAction !== undefined) u[1] = s.serviceAction;
  u[s.cdbBytes - 1] = 0x00; // control byte: no NACA, no link
  return u;
}

function allCommandsDescriptor(rctd: boolean): Buffer {
  const each = rctd ? 20 : 8;
  const d = Buffer.alloc(4 + table.length * each);
  d.writeUInt32BE(table.length * each, 0);
  table.forEach((s, i) => {
    const off = 4 + i * each;
    d[off] = s.opcode;
    d.writeUInt16BE(s.serviceAction ?? 0, off + 2);
    d[off + 5] = (rctd ? 0x02 : 0) | (s.serviceAction !== undefined ? 0x01 : 0);
    d.writeUInt16BE(s.cdbBytes, off + 6);
    if (rctd) d.writeUInt16BE(0x0a, off + 8);
  });
  return d;
}
