// A raw iSCSI initiator for the fuzz suite and the hostile-load runs: it logs in the plain way
// (AuthMethod=None, to an open volume) and then sends whatever it is given, well-formed PDUs
// (encoded by src/iscsi/pdu.ts, which encodes initiator PDUs too) or arbitrary bytes. Every
// wait is bounded; `close()` ends the socket. The well-behaved half (`writeBlocks`,
// `readBlocks`) is what the fuzz suite uses to check that normal hosts are still served.

import { Socket } from 'node:net';
import { encodePdu } from '../../src/iscsi/pdu';
import { PduParser } from '../../src/iscsi/parser';
import { encodeTextKeys, parseTextKeys } from '../../src/iscsi/text';
import { Op, type Pdu, type ScsiCommandPdu } from '../../src/iscsi/types';

export const iqnPrefix = 'iqn.2026-11.io.peersan:';
/**
 * Where hostile clients connect from: a loopback address of their own, so that a target
 * that bounds connections per source address (issue 15 item 4) tells them from the normal
 * host on 127.0.0.1, as it would tell two machines apart.
 */
export const hostileAddress = '127.0.0.2';
export const lun0 = Buffer.alloc(8);
const noData = Buffer.alloc(0);
/** The reserved tag (RFC 7143 11.2.1.8): no task, no transfer, unsolicited data. */
export const reservedTag = 0xffffffff;
const digestsOff = { header: false, data: false };

export interface LoginOptions {
  /** Target volume; absent: a Discovery session. */
  volume?: string;
  initiator?: string;
  /** Operational keys sent in the second login PDU (key → value), over the defaults. */
  keys?: Record<string, string>;
  /** Stop after the security stage (a login that never finishes). */
  securityOnly?: boolean;
}

export interface LoginResult {
  ok: boolean;
  status: number;
  keys: Map<string, string>;
}

export interface ScsiResult {
  status: number;
  /** Sense key, ASC, ASCQ when CHECK CONDITION carried sense data. */
  sense?: { key: number; asc: number; ascq: number };
  data: Buffer;
}

/** The sense key/ASC/ASCQ in a SCSI Response's data segment (2 bytes length, then fixed or descriptor sense). */
function senseOf(data: Buffer): ScsiResult['sense'] {
  if (data.length < 2 + 14) return undefined;
  const s = data.subarray(2);
  if ((s[0] & 0x7f) >= 0x72) return { key: s[1] & 0x0f, asc: s[2], ascq: s[3] };
  return { key: s[2] & 0x0f, asc: s[12], ascq: s[13] };
}

let isids = 0;

/** A random-type ISID (0x80) unique in this process: the pid and a counter. */
function nextIsid(): Buffer {
  const b = Buffer.alloc(6);
  b[0] = 0x80;
  b.writeUInt16BE(process.pid & 0xffff, 1);
  b.writeUIntBE(++isids & 0xffffff, 3, 3);
  return b;
}

export class RawIscsi {
  readonly socket: Socket;
  private readonly parser = new PduParser({ maxRecvDataSegmentBytes: 16 * 1024 * 1024, headerDigest: false, dataDigest: false });
  private readonly inbox: Pdu[] = [];
  private waiter: (() => void) | undefined;
  closed = false;
  /** Set when the target sent bytes the parser could not frame (a target bug, not ours). */
  garbled: string | undefined;
  cmdSN = 1;
  expStatSN = 0;
  private nextItt = 1;
  /**
   * Each connection its own session id: a login with the ISID and initiator name of a live
   * session reinstates it (RFC 7143 6.3.5), which would close another client's session.
   */
  private readonly isid = nextIsid();
  /** The target's MaxRecvDataSegmentLength: the most one Data-Out may carry. */
  targetRecvBytes = 8192;
  firstBurstBytes = 65536;
  immediateData = true;
  initialR2T = true;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  /** Connect to 127.0.0.1:`port`, from `localAddress` (another loopback address is another source to the target). */
  static connect(port: number, localAddress = '127.0.0.1', timeoutMs = 5_000): Promise<RawIscsi> {
    return new Promise((resolve, reject) => {
      const socket = new Socket();
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`iSCSI connect to ${port} timed out`));
      }, timeoutMs);
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      socket.connect({ port, host: '127.0.0.1', localAddress }, () => {
        clearTimeout(timer);
        socket.setNoDelay(true);
        resolve(new RawIscsi(socket));
      });
    });
  }

  private onData(chunk: Buffer): void {
    this.parser.push(chunk);
    for (let e = this.parser.next(); e; e = this.parser.next()) {
      if (e.kind === 'pdu') {
        this.inbox.push(e.pdu);
        if ('statSN' in e.pdu && e.pdu.opcode !== Op.dataIn && e.pdu.opcode !== Op.r2t) this.expStatSN = (e.pdu.statSN + 1) >>> 0;
        else if (e.pdu.opcode === Op.dataIn && e.pdu.hasStatus) this.expStatSN = (e.pdu.statSN + 1) >>> 0;
      } else {
        this.garbled = e.kind === 'fatal' ? e.error.message : `unparseable PDU (reason ${e.reason})`;
      }
    }
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  /** The next received PDU that `match` accepts (others stay queued), or undefined at the timeout or close. */
  async next(timeoutMs: number, match: (p: Pdu) => boolean = () => true): Promise<Pdu | undefined> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.inbox.findIndex(match);
      if (i >= 0) return this.inbox.splice(i, 1)[0];
      const left = deadline - Date.now();
      if (this.closed || left <= 0) return undefined;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  /** Drop what was received so far (a fuzz case does not read its answers). */
  drain(): number {
    return this.inbox.splice(0).length;
  }

  writeRaw(b: Buffer): void {
    if (!this.closed) this.socket.write(b);
  }

  send(pdu: Pdu): void {
    for (const chunk of encodePdu(pdu, digestsOff)) this.writeRaw(chunk);
  }

  /** Encode without sending (a fuzz case mutates the bytes first). */
  static encode(pdu: Pdu): Buffer {
    return Buffer.concat(encodePdu(pdu, digestsOff));
  }

  itt(): number {
    const t = this.nextItt;
    this.nextItt = this.nextItt >= 0x7fff_ffff ? 1 : this.nextItt + 1;
    return t;
  }

  /** One login request PDU (the fuzz cases mutate these). */
  loginPdu(keys: Array<[string, string]>, stage: { csg: number; nsg: number; transit: boolean }, itt = 0): Pdu {
    return {
      opcode: Op.loginRequest, immediate: true, final: stage.transit, initiatorTaskTag: itt, data: encodeTextKeys(keys),
      transit: stage.transit, continue: false, csg: stage.csg, nsg: stage.nsg, versionMax: 0, versionMin: 0,
      isid: this.isid, tsih: 0, cid: 0, cmdSN: this.cmdSN, expStatSN: this.expStatSN,
    };
  }

  /** Log in: security stage (AuthMethod=None), then operational keys, to full feature phase. */
  async login(o: LoginOptions = {}, timeoutMs = 5_000): Promise<LoginResult> {
    const initiator = o.initiator ?? 'iqn.2026-11.io.peersan.test:fuzz';
    const first: Array<[string, string]> = [['InitiatorName', initiator], ['SessionType', o.volume ? 'Normal' : 'Discovery'], ['AuthMethod', 'None']];
    if (o.volume) first.splice(1, 0, ['TargetName', iqnPrefix + o.volume]);
    const r1 = await this.loginStep(first, { csg: 0, nsg: 1, transit: true }, timeoutMs);
    if (!r1.ok || o.securityOnly) return r1;
    const ops = {
      HeaderDigest: 'None', DataDigest: 'None', MaxRecvDataSegmentLength: '262144', InitialR2T: 'No', ImmediateData: 'Yes',
      MaxBurstLength: '1048576', FirstBurstLength: '65536', MaxOutstandingR2T: '1', DataPDUInOrder: 'Yes', DataSequenceInOrder: 'Yes',
      ErrorRecoveryLevel: '0', ...(o.volume ? {} : { HeaderDigest: 'None' }), ...o.keys,
    };
    const r2 = await this.loginStep(Object.entries(ops), { csg: 1, nsg: 3, transit: true }, timeoutMs);
    for (const [k, v] of r1.keys) if (!r2.keys.has(k)) r2.keys.set(k, v);
    this.targetRecvBytes = Number(r2.keys.get('MaxRecvDataSegmentLength') ?? 8192);
    this.firstBurstBytes = Number(r2.keys.get('FirstBurstLength') ?? 65536);
    this.immediateData = (r2.keys.get('ImmediateData') ?? 'Yes') === 'Yes';
    this.initialR2T = (r2.keys.get('InitialR2T') ?? 'Yes') === 'Yes';
    return r2;
  }

  /** One login request and its response (a case drives the stages itself). */
  async loginStep(keys: Array<[string, string]>, stage: { csg: number; nsg: number; transit: boolean }, timeoutMs: number): Promise<LoginResult> {
    this.send(this.loginPdu(keys, stage));
    const reply = await this.next(timeoutMs, (p) => p.opcode === Op.loginResponse);
    if (!reply || reply.opcode !== Op.loginResponse) return { ok: false, status: -1, keys: new Map() };
    return { ok: reply.status === 0, status: reply.status, keys: new Map(parseTextKeys(reply.data)) };
  }

  /** A SCSI command PDU with this connection's sequence numbers (not sent). */
  command(cdb: Buffer, o: { read?: boolean; write?: boolean; edtl: number; data?: Buffer; immediate?: boolean; itt?: number; cmdSN?: number }): ScsiCommandPdu {
    const cmdSN = o.cmdSN ?? this.cmdSN;
    if (o.cmdSN === undefined && !o.immediate) this.cmdSN = (this.cmdSN + 1) >>> 0;
    // F=0 announces unsolicited Data-Outs (InitialR2T=No, first burst not all immediate): RFC 7143 11.3.4.
    const unsolicitedFollows = (o.write ?? false) && !this.initialR2T && (o.data?.length ?? 0) < Math.min(o.edtl, this.firstBurstBytes);
    return {
      opcode: Op.scsiCommand, immediate: o.immediate ?? false, final: !unsolicitedFollows, initiatorTaskTag: o.itt ?? this.itt(), data: o.data ?? noData,
      read: o.read ?? false, write: o.write ?? false, taskAttr: 1, lun: lun0, expectedDataTransferLength: o.edtl,
      cmdSN, expStatSN: this.expStatSN, cdb,
    };
  }

  dataOut(itt: number, ttt: number, dataSN: number, bufferOffset: number, data: Buffer, final: boolean): Pdu {
    return { opcode: Op.dataOut, immediate: false, final, initiatorTaskTag: itt, data, lun: lun0, targetTransferTag: ttt, expStatSN: this.expStatSN, dataSN, bufferOffset };
  }

  nopOut(o: { itt?: number; ttt?: number; immediate?: boolean; data?: Buffer } = {}): Pdu {
    const immediate = o.immediate ?? true;
    return {
      opcode: Op.nopOut, immediate, final: true, initiatorTaskTag: o.itt ?? this.itt(), data: o.data ?? noData, lun: lun0,
      targetTransferTag: o.ttt ?? reservedTag, cmdSN: this.cmdSN, expStatSN: this.expStatSN,
    };
  }

  /** NOP-Out ping: true when the NOP-In came back in time (the session is alive and reads us). */
  async ping(timeoutMs = 5_000): Promise<boolean> {
    const pdu = this.nopOut();
    this.send(pdu);
    const itt = pdu.initiatorTaskTag;
    return (await this.next(timeoutMs, (p) => p.opcode === Op.nopIn && p.initiatorTaskTag === itt)) !== undefined;
  }

  /** Wait for the end of the command `itt`: Data-In gathered at their offsets, the status from the last Data-In or the SCSI Response. */
  async result(itt: number, edtl: number, timeoutMs: number): Promise<ScsiResult | undefined> {
    // Data-In land where their buffer offsets say: a gap stays zero and shows as a mismatch.
    const data = Buffer.alloc(edtl);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const p = await this.next(deadline - Date.now(), (q) => q.initiatorTaskTag === itt && (q.opcode === Op.dataIn || q.opcode === Op.scsiResponse || q.opcode === Op.reject));
      if (!p) return undefined;
      if (p.opcode === Op.reject) return { status: -1, data };
      if (p.opcode === Op.dataIn) {
        p.data.copy(data, p.bufferOffset, 0, Math.max(0, Math.min(p.data.length, edtl - p.bufferOffset)));
        if (p.hasStatus) return { status: p.status, data };
        continue;
      }
      if (p.opcode === Op.scsiResponse) return { status: p.status, sense: senseOf(p.data), data };
    }
  }

  /**
   * `run` again while it answers UNIT ATTENTION (a reset or reservation change by another
   * session is reported once per nexus; a well-behaved host retries), at most three times.
   */
  private async pastUnitAttention(run: () => Promise<ScsiResult | undefined>): Promise<ScsiResult | undefined> {
    let r = await run();
    for (let i = 0; i < 3 && r?.sense?.key === 6; i++) r = await run();
    return r;
  }

  /** READ(16) of `blocks` blocks of `blockBytes` at `lba` (past a UNIT ATTENTION). */
  readBlocks(lba: number, blocks: number, blockBytes: number, timeoutMs = 10_000): Promise<ScsiResult | undefined> {
    return this.pastUnitAttention(() => this.readOnce(lba, blocks, blockBytes, timeoutMs));
  }

  /** WRITE(16) of `data` at `lba` (past a UNIT ATTENTION). */
  writeBlocks(lba: number, data: Buffer, blockBytes: number, timeoutMs = 10_000): Promise<ScsiResult | undefined> {
    return this.pastUnitAttention(() => this.writeOnce(lba, data, blockBytes, timeoutMs));
  }

  private async readOnce(lba: number, blocks: number, blockBytes: number, timeoutMs: number): Promise<ScsiResult | undefined> {
    const edtl = blocks * blockBytes;
    const cmd = this.command(rw16(0x88, lba, blocks), { read: true, edtl });
    this.send(cmd);
    return this.result(cmd.initiatorTaskTag, edtl, timeoutMs);
  }

  /** Immediate data up to the first burst, unsolicited Data-Out, then Data-Out for each R2T, in order. */
  private async writeOnce(lba: number, data: Buffer, blockBytes: number, timeoutMs: number): Promise<ScsiResult | undefined> {
    const immediateBytes = this.immediateData ? Math.min(data.length, this.firstBurstBytes, this.targetRecvBytes) : 0;
    const cmd = this.command(rw16(0x8a, lba, data.length / blockBytes), { write: true, edtl: data.length, data: data.subarray(0, immediateBytes) });
    const itt = cmd.initiatorTaskTag;
    this.send(cmd);
    let sent = immediateBytes;
    // Unsolicited Data-Out up to the first burst when InitialR2T=No.
    if (!this.initialR2T && sent < data.length) sent = this.sendBurst(itt, reservedTag, sent, Math.min(data.length, this.firstBurstBytes) - sent, data);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const p = await this.next(deadline - Date.now(), (q) => q.initiatorTaskTag === itt && (q.opcode === Op.r2t || q.opcode === Op.scsiResponse || q.opcode === Op.reject));
      if (!p) return undefined;
      if (p.opcode === Op.r2t) {
        this.sendBurst(itt, p.targetTransferTag, p.bufferOffset, p.desiredDataTransferLength, data);
        continue;
      }
      if (p.opcode === Op.reject) return { status: -1, data: noData };
      if (p.opcode === Op.scsiResponse) return { status: p.status, sense: senseOf(p.data), data: noData };
    }
  }

  /** Data-Out PDUs (DataSN from 0) covering data[offset, offset + length); the end offset. */
  private sendBurst(itt: number, ttt: number, offset: number, length: number, data: Buffer): number {
    const end = Math.min(data.length, offset + length);
    for (let at = offset, sn = 0; at < end; sn++) {
      const n = Math.min(this.targetRecvBytes, end - at);
      this.send(this.dataOut(itt, ttt, sn, at, data.subarray(at, at + n), at + n >= end));
      at += n;
    }
    return end;
  }

  close(): void {
    this.closed = true;
    this.socket.destroy();
  }
}

/** READ(16) / WRITE(16) CDB. */
export function rw16(op: number, lba: number, blocks: number): Buffer {
  const cdb = Buffer.alloc(16);
  cdb[0] = op;
  cdb.writeUInt32BE(Math.floor(lba / 0x1_0000_0000), 2);
  cdb.writeUInt32BE(lba >>> 0, 6);
  cdb.writeUInt32BE(blocks >>> 0, 10);
  return cdb;
}

/**
 * Log in to `volume` and get past the power-on UNIT ATTENTION (a first command answers it
 * once per nexus), so that the next commands answer plainly.
 */
export async function openSession(port: number, volume: string, keys?: Record<string, string>, localAddress?: string): Promise<RawIscsi> {
  const c = await RawIscsi.connect(port, localAddress);
  const r = await c.login({ volume, keys });
  if (!r.ok) {
    c.close();
    throw new Error(`login to ${volume} failed: status 0x${r.status.toString(16)}`);
  }
  const tur = c.command(Buffer.alloc(6), { edtl: 0 });
  c.send(tur);
  await c.result(tur.initiatorTaskTag, 0, 5_000);
  return c;
}
