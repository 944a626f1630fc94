// A full-feature-phase Session with no sockets: typed PDUs in, typed PDUs out, and a fake
// logical unit whose completions the test controls. Shared by the session tests.

import pino from 'pino';
import { defaultSessionParams } from '../../src/iscsi/negotiate';
import { ByteBudget } from '../../src/iscsi/budget';
import { Session, type SessionIo } from '../../src/iscsi/session';
import { peerTaskBytesMax } from '../../src/limits';
import type { TargetDirectory, TargetInfo } from '../../src/iscsi/target';
import { Op, type DataOutPdu, type InitiatorPdu, type SessionParams, type TargetPdu } from '../../src/iscsi/types';
import type { LogicalUnit, ScsiCommand, ScsiResult } from '../../src/scsi/types';

export const lun0 = Buffer.alloc(8);
export const reservedTag = 0xffffffff;

/** A LU that records commands (with a copy of their data) and answers when the test says so (or at once). */
export class FakeLu implements LogicalUnit {
  readonly lun = 0;
  readonly seen: ScsiCommand[] = [];
  readonly pending: Array<(r: ScsiResult) => void> = [];
  auto: ((c: ScsiCommand) => ScsiResult) | undefined;
  resets = 0;
  execute(cmd: ScsiCommand): Promise<ScsiResult> {
    this.seen.push({ ...cmd, dataOut: cmd.dataOut ? Buffer.from(cmd.dataOut) : null });
    if (this.auto) return Promise.resolve(this.auto(cmd));
    return new Promise((resolve) => this.pending.push(resolve));
  }
  reset(): void {
    this.resets++;
  }
  nexusLost(): void | Promise<void> {}
}

export interface Fixture {
  s: Session;
  lu: FakeLu;
  out: TargetPdu[];
  closed: string[];
  /** Flush callbacks held back (with holdFlushes): the socket has not taken those answers yet. */
  flushes: Array<() => void>;
  budget: ByteBudget;
}

export function setup(params: Partial<SessionParams> = {}, extra: { io?: Partial<SessionIo>; budget?: ByteBudget; holdFlushes?: boolean; readDataSent?: (data: Buffer) => void } = {}): Fixture {
  const lu = new FakeLu();
  const target: TargetInfo = { name: 'iqn.2026-11.io.peersan:v', allow: [], luns: new Map([[0, lu]]) };
  const directory: TargetDirectory = { portalGroupTag: 1, portalAddresses: ['127.0.0.1:3260'], find: () => target, visibleTo: () => [target] };
  const out: TargetPdu[] = [];
  const closed: string[] = [];
  const flushes: Array<() => void> = [];
  const budget = extra.budget ?? new ByteBudget(peerTaskBytesMax);
  // By default the socket takes every answer at once; holdFlushes plays a host that never reads.
  const send = (p: TargetPdu, flushed?: () => void): void => {
    out.push(p);
    if (flushed) extra.holdFlushes ? flushes.push(flushed) : flushed();
  };
  const s = new Session({
    sessionType: 'Normal', initiatorName: 'iqn.x:y', target, directory,
    params: { ...defaultSessionParams(), maxRecvDataSegmentLength: 65536, maxXmitDataSegmentLength: 8192, ...params },
    expCmdSN: 1, statSN: 100, nexus: { initiatorPort: 'i', initiatorName: 'iqn.x:y', targetPort: 't', relativeTargetPort: 1 },
    io: { send, close: (r) => closed.push(r), ...extra.io }, log: pino({ level: 'silent' }), nowMs: 0, budget,
    ...(extra.readDataSent ? { readDataSent: extra.readDataSent } : {}),
  });
  return { s, lu, out, closed, flushes, budget };
}

export function cmd(itt: number, cmdSN: number, opts: { read?: boolean; write?: boolean; edtl?: number; data?: Buffer; immediate?: boolean; final?: boolean; cdb?: Buffer } = {}): InitiatorPdu {
  return {
    opcode: Op.scsiCommand, immediate: opts.immediate ?? false, final: opts.final ?? true, initiatorTaskTag: itt, data: opts.data ?? Buffer.alloc(0),
    read: opts.read ?? false, write: opts.write ?? false, taskAttr: 1, lun: lun0, expectedDataTransferLength: opts.edtl ?? 0,
    cmdSN, expStatSN: 100, cdb: opts.cdb ?? Buffer.from('2800000000000000010000000000000000'.slice(0, 32), 'hex'),
  };
}

/** A WRITE(10) CDB (the direction the transport checks the R/W flags against). */
export const write10 = Buffer.from('2a000000000000000800000000000000', 'hex');

export function dataOut(itt: number, o: { ttt?: number; dataSN: number; offset: number; data: Buffer; final?: boolean }): DataOutPdu {
  return {
    opcode: Op.dataOut, immediate: false, final: o.final ?? false, initiatorTaskTag: itt, data: o.data, lun: lun0,
    targetTransferTag: o.ttt ?? reservedTag, expStatSN: 0, dataSN: o.dataSN, bufferOffset: o.offset,
  };
}

export const tick = (): Promise<void> => new Promise((r) => setImmediate(r));
