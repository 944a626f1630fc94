// One iSCSI session in full feature phase (RFC 7143), one connection (MaxConnections=1).
// No sockets or timers here: PDUs come in through onPdu, go out through io.send, time comes
// in through tick(nowMs). In this order, for each command: the CmdSN window is checked before
// anything is kept; the command is delivered in CmdSN order; it is admitted once its bytes
// (EDTL) fit the session's bound and the peer's shared ByteBudget (a waiting command holds
// nothing but the unsolicited data it parked); only then is a write's buffer allocated and its
// data solicited by R2T; its data (immediate, unsolicited, solicited) must arrive exactly once,
// in order, before the LU sees it; read data goes back as Data-In PDUs with the status in the
// last one, and its bytes stay taken until they have left for the socket.

import type { Logger } from 'pino';
import { answerStallMsMax, bhsBytes, cmdWindowPerSession, nopIdleMs, nopTimeoutMs, sessionAnswerBytesMax, sessionGuaranteedBytes, sessionParkedBytesMax, sessionTaskBytesMax, transferBytesMax } from '../limits';
import { LogLimiter } from '../log';
import { dataDirection } from '../scsi/direction';
import { Asc, checkCondition, SenseKey } from '../scsi/sense';
import { ScsiStatus, type LogicalUnit, type Nexus, type ScsiResult } from '../scsi/types';
import type { ByteBudget, BudgetWaiter } from './budget';
import { sendTargetsAnswer } from './discovery';
import type { TargetDirectory, TargetInfo } from './target';
import { encodeTextKeys, parseTextKeys, TextAccumulator, type TextPairs } from './text';
import {
  AsyncEvent,
  LogoutReason,
  LogoutResponseCode,
  Op,
  RejectReason,
  ScsiResponseCode,
  TmfFunction,
  TmfResponse,
  lunIndex,
  lunZero,
  type DataOutPdu,
  type InitiatorPdu,
  type LogoutRequestPdu,
  type NopOutPdu,
  type ScsiCommandPdu,
  type SessionParams,
  type TargetPdu,
  type TaskMgmtRequestPdu,
  type TextRequestPdu,
} from './types';

const reservedTag = 0xffffffff;
/** The data segment of the PDUs we send without one (zero bytes: nothing can be written into it). */
const noData = Buffer.alloc(0);

// ---- serial number arithmetic (RFC 1982, 32 bits) ----------------------------------------
export function snLess(a: number, b: number): boolean {
  return a !== b && ((b - a) >>> 0) < 0x80000000;
}
export function snLessEq(a: number, b: number): boolean {
  return a === b || snLess(a, b);
}

export interface SessionIo {
  /** `flushed` (when given) is called once the PDU has left for the socket, or the connection is gone. */
  send(pdu: TargetPdu, flushed?: () => void): void;
  /** Drop the connection once what was sent is flushed. */
  close(reason: string): void;
}

export interface SessionOptions {
  sessionType: 'Discovery' | 'Normal';
  initiatorName: string;
  target?: TargetInfo;
  directory: TargetDirectory;
  params: SessionParams;
  expCmdSN: number;
  statSN: number;
  nexus: Nexus;
  io: SessionIo;
  log: Logger;
  nowMs: number;
  /** The peer's bytes for command data, shared by all its sessions. */
  budget: ByteBudget;
  /**
   * Told of a read's data once its last PDU has left for the socket (the socket's write
   * callback: the kernel has the bytes, or the connection is gone): nothing here reads the
   * data after that, so its buffer may be reused.
   */
  readDataSent?(data: Buffer): void;
}

/**
 * One sequence of data-out (RFC 7143 4.2.5): the unsolicited one (immediate data, then
 * Data-Out PDUs with the reserved TTT) or the answer to one R2T. We negotiate
 * DataPDUInOrder=Yes and DataSequenceInOrder=Yes, so its PDUs must come in order, each
 * starting where the previous one ended: no overlap, no gap, nothing past its end.
 */
interface Sequence {
  offset: number;
  length: number;
  /** Bytes received so far: the next PDU must start at offset + received. */
  received: number;
  nextDataSN: number;
}

interface Task {
  itt: number;
  cmdSN: number;
  pdu: ScsiCommandPdu;
  lun: number;
  edtl: number;
  /** Gathered data-out (an admitted write that has not failed) or null. */
  buffer: Buffer | null;
  /** Admitted: its bytes are taken from the session's and the peer's budget (a waiting task holds none). */
  admitted: boolean;
  /** Bytes taken for this task, given back when its buffer is dropped or its read data flushed. */
  chargedBytes: number;
  /** Whether they came from the peer's shared budget (else from the session's guaranteed bytes). */
  fromBudget: boolean;
  /** Unsolicited data that came before admission (views, in order after the immediate data). */
  parked: Buffer[] | null;
  /** Immediate and parked bytes held before admission, counted against sessionParkedBytesMax. */
  parkedBytes: number;
  /** The unsolicited sequence while Data-Outs with the reserved TTT are still owed, else null. */
  unsolicited: Sequence | null;
  /** Offset up to which the data is covered by a sequence (unsolicited, then R2Ts issued). */
  solicitedTo: number;
  r2tOutstanding: Map<number, Sequence>;
  r2tSN: number;
  executing: boolean;
  aborted: boolean;
  /** The LU call has returned (or the task never reached it). */
  settled: boolean;
  /** Who waits for `settled` (an abort); created only then: most tasks are never waited for. */
  settledWaiters: (() => void)[] | null;
  /**
   * The command's answer when it cannot run (limits, flags, a broken data phase): sent once
   * the initiator owes no more data for it, and the LU never sees the command.
   */
  failure?: ScsiResult;
}

function settle(task: Task): void {
  task.settled = true;
  for (const resolve of task.settledWaiters?.splice(0) ?? []) resolve();
}

/** Resolves when the task's LU call has returned (at once if it already has or never started). */
function settled(task: Task): Promise<void> {
  if (task.settled) return Promise.resolve();
  return new Promise((resolve) => (task.settledWaiters ??= []).push(resolve));
}

/** Sessions answer in fixed-format sense (what every initiator reads). */
const check = (key: number, asc: number): ScsiResult => checkCondition({ key, asc }, false);
/** ILLEGAL REQUEST, INVALID FIELD IN CDB: the command cannot be carried as sent. */
const invalidCdb = (): ScsiResult => check(SenseKey.illegalRequest, Asc.invalidFieldInCdb);
const dataPhaseError = (): ScsiResult => check(SenseKey.abortedCommand, Asc.dataPhaseError); // wrong DataSN
const invalidTtt = (): ScsiResult => check(SenseKey.abortedCommand, Asc.invalidTargetPortTransferTag);
const dataOffsetError = (): ScsiResult => check(SenseKey.abortedCommand, Asc.dataOffsetError); // overlap or gap
const unexpectedUnsolicitedData = (): ScsiResult => check(SenseKey.abortedCommand, Asc.unexpectedUnsolicitedData);
const incorrectAmountOfData = (): ScsiResult => check(SenseKey.abortedCommand, Asc.incorrectAmountOfData);

/** A broken data phase is a hostile or buggy initiator's to repeat at will: warn once in a while. */
const dataPhaseWarnings = new LogLimiter();

/** Standard INQUIRY data for a LUN that does not exist: peripheral qualifier 3, type 0x1f. */
function inquiryNoLun(allocation: number): Buffer {
  const d = Buffer.alloc(36);
  d[0] = 0x7f;
  d[2] = 0x06;
  d[3] = 0x02;
  d[4] = 31;
  return d.subarray(0, Math.min(36, allocation));
}

export class Session {
  readonly opts: SessionOptions;
  private readonly params: SessionParams;
  private readonly io: SessionIo;
  private readonly log: Logger;
  private expCmdSN: number;
  private maxCmdSN: number;
  private statSN: number;
  private readonly tasks = new Map<number, Task>();
  /** Non-immediate commands that arrived ahead of a CmdSN gap, by CmdSN. */
  private readonly pending = new Map<number, () => void>();
  /** Delivered commands waiting for bytes, in CmdSN order. */
  private readonly admitQueue: Task[] = [];
  /** Bytes taken by this session's tasks (sessionTaskBytesMax), and held for tasks not admitted. */
  private heldBytes = 0;
  /** The part of heldBytes taken from the peer's shared budget. */
  private budgetBytes = 0;
  private parkedBytes = 0;
  /** Answered reads whose data has not left for the socket yet; their bytes stay taken. */
  private readonly awaitingFlush = new Set<Task>();
  private flushes = 0;
  /** Answers other than read data not yet flushed (sessionAnswerBytesMax). */
  private answerBytes = 0;
  private stall = { flushes: 0, sinceMs: 0 };
  private pumping = false;
  private readonly budget: ByteBudget;
  private readonly waiter: BudgetWaiter = { wake: () => this.pump() };
  private nextTtt = 1;
  private lastRxMs: number;
  private ping: { ttt: number; sentMs: number } | undefined;
  private readonly text = new TextAccumulator();
  private textContinuation: { ttt: number; rest: Buffer; itt: number } | undefined;
  private draining = false;
  private ended = false;
  /** Set once every LU was told the nexus ended (endNexus). */
  private nexusEnded: Promise<unknown> | undefined;
  private readonly idleWaiters: Array<() => void> = [];

  constructor(opts: SessionOptions) {
    this.opts = opts;
    this.params = opts.params;
    this.io = opts.io;
    this.log = opts.log;
    this.expCmdSN = opts.expCmdSN;
    this.statSN = opts.statSN;
    this.maxCmdSN = (opts.expCmdSN + cmdWindowPerSession - 1) >>> 0;
    this.lastRxMs = opts.nowMs;
    this.budget = opts.budget;
    this.stall.sinceMs = opts.nowMs;
  }

  /** Bytes this session holds for its commands (taken, and parked before admission). */
  get bytesHeld(): number {
    return this.heldBytes + this.parkedBytes;
  }

  get commandsInFlight(): number {
    return this.tasks.size;
  }

  // ---- input ----------------------------------------------------------------------------

  onPdu(pdu: InitiatorPdu, nowMs: number): void {
    if (this.ended) return;
    this.lastRxMs = nowMs;
    switch (pdu.opcode) {
      case Op.scsiCommand:
        return this.onScsiCommand(pdu);
      case Op.dataOut:
        return this.onDataOut(pdu);
      case Op.nopOut:
        return this.sequenced(pdu.immediate, pdu.cmdSN, () => this.onNopOut(pdu), pdu.initiatorTaskTag === reservedTag);
      case Op.taskMgmtRequest:
        return this.sequenced(pdu.immediate, pdu.cmdSN, () => void this.onTaskMgmt(pdu));
      case Op.textRequest:
        return this.sequenced(pdu.immediate, pdu.cmdSN, () => this.onText(pdu));
      case Op.logoutRequest:
        return this.sequenced(pdu.immediate, pdu.cmdSN, () => void this.onLogout(pdu));
      case Op.snack:
        return this.reject(RejectReason.snackReject, pdu);
      default:
        return this.reject(RejectReason.protocolError, pdu);
    }
  }

  /** A PDU the parser skipped (digest error, too long, unknown opcode): answer with a Reject. */
  rejectBhs(reason: number, bhs: Buffer): void {
    this.send({
      opcode: Op.reject, immediate: false, final: true, initiatorTaskTag: reservedTag,
      data: Buffer.from(bhs.subarray(0, 48)), reason, statSN: this.nextStatSN(),
      expCmdSN: this.expCmdSN, maxCmdSN: this.windowEnd(), dataSN: 0,
    });
  }

  private reject(reason: number, pdu: InitiatorPdu): void {
    // The rejected header is rebuilt from the decoded PDU only for the fields an initiator uses to match it.
    const bhs = Buffer.alloc(48);
    bhs[0] = pdu.opcode | (pdu.immediate ? 0x40 : 0);
    bhs.writeUInt32BE(pdu.initiatorTaskTag >>> 0, 16);
    this.rejectBhs(reason, bhs);
  }

  /**
   * Deliver non-immediate commands in CmdSN order. Immediate ones run at once and do not
   * advance ExpCmdSN. A CmdSN outside the window is dropped silently (RFC 7143 4.2.2.1).
   */
  private sequenced(immediate: boolean, cmdSN: number, run: () => void, noCmdSN = false): void {
    if (immediate || noCmdSN) {
      run();
      return;
    }
    if (cmdSN === this.expCmdSN) {
      this.expCmdSN = (this.expCmdSN + 1) >>> 0;
      run();
      this.drainPending();
      return;
    }
    if (this.inWindow(cmdSN)) {
      this.pending.set(cmdSN, run);
      return;
    }
    this.dropOutOfWindow(cmdSN);
  }

  /** A CmdSN we take: the next one, or one ahead inside the window not already held. */
  private inWindow(cmdSN: number): boolean {
    return cmdSN === this.expCmdSN || (snLess(this.expCmdSN, cmdSN) && snLessEq(cmdSN, this.maxCmdSN) && !this.pending.has(cmdSN));
  }

  private dropOutOfWindow(cmdSN: number): void {
    this.log.debug({ cmdSN, expCmdSN: this.expCmdSN, maxCmdSN: this.maxCmdSN }, 'command outside the CmdSN window dropped');
  }

  private drainPending(): void {
    for (let run = this.pending.get(this.expCmdSN); run; run = this.pending.get(this.expCmdSN)) {
      this.pending.delete(this.expCmdSN);
      this.expCmdSN = (this.expCmdSN + 1) >>> 0;
      run();
    }
  }

  // ---- SCSI commands --------------------------------------------------------------------

  private onScsiCommand(pdu: ScsiCommandPdu): void {
    if (this.opts.sessionType === 'Discovery') return this.reject(RejectReason.protocolError, pdu);
    // The window first: a command outside it is dropped before anything is kept for it.
    if (!pdu.immediate && !this.inWindow(pdu.cmdSN)) return this.dropOutOfWindow(pdu.cmdSN);
    // Immediate commands skip CmdSN ordering, not the bound on commands held (RFC 7143 4.2.2.1).
    if (pdu.immediate && this.tasks.size >= cmdWindowPerSession) return this.reject(RejectReason.immediateCommandReject, pdu);
    if (this.tasks.has(pdu.initiatorTaskTag)) return this.reject(RejectReason.taskInProgress, pdu);
    // No new work while we close: answer BUSY so the initiator retries elsewhere.
    const task = this.createTask(pdu, this.draining ? { status: ScsiStatus.busy } : this.refusal(pdu));
    this.tasks.set(task.itt, task);
    this.sequenced(pdu.immediate, pdu.cmdSN, () => this.admit(task));
    // Waiting (for its CmdSN or for bytes): its immediate data is held meanwhile.
    if (!task.admitted && !task.failure && pdu.data.length > 0) this.park(task, pdu.data.length);
  }

  private createTask(pdu: ScsiCommandPdu, failure: ScsiResult | undefined): Task {
    const task: Task = {
      // cdb and lun stay views into the socket chunk they came in (Node never reuses those).
      itt: pdu.initiatorTaskTag, cmdSN: pdu.cmdSN, pdu, lun: lunIndex(pdu.lun), edtl: pdu.expectedDataTransferLength,
      buffer: null, admitted: false, chargedBytes: 0, fromBudget: false, parked: null, parkedBytes: 0, unsolicited: null, solicitedTo: 0, r2tOutstanding: new Map(), r2tSN: 0,
      executing: false, aborted: false, settled: false, settledWaiters: null, failure,
    };
    if (pdu.write && task.edtl > 0) this.startDataOut(task);
    return task;
  }

  /** Why a command must not run, judged from its header and immediate data alone (undefined: it may run). */
  private refusal(pdu: ScsiCommandPdu): ScsiResult | undefined {
    const edtl = pdu.expectedDataTransferLength;
    const immediateBytes = pdu.data.length;
    if (pdu.read && pdu.write) return invalidCdb(); // bidirectional: not supported
    if (edtl > transferBytesMax) return invalidCdb();
    // Data expected with no direction, or a command that takes data sent without W (a WRITE with
    // only R would reach the LU with no data and "succeed" having written nothing). The other way
    // round, a READ with only W, stays GOOD with no data: its data-out is gathered and unused, and
    // libiscsi's conformance suite requires GOOD for it (iSCSIResiduals.Read10Invalid).
    if (edtl > 0 && !pdu.read && !pdu.write) return invalidCdb();
    if (edtl > 0 && !pdu.write && dataDirection(pdu.cdb) === 'out') return invalidCdb();
    if (immediateBytes > 0 && (!pdu.write || !this.params.immediateData)) return unexpectedUnsolicitedData();
    if (immediateBytes > edtl || immediateBytes > this.params.firstBurstLength) return incorrectAmountOfData();
    return undefined;
  }

  /**
   * Lay out a write's data: the immediate data, then unsolicited Data-Outs up to
   * FirstBurstLength (only with InitialR2T=No and the command's F bit clear: F says none
   * follow), then R2Ts for the rest. The parts do not overlap and each is a Sequence taken
   * strictly in order, so when every sequence is full every byte of the buffer was written
   * exactly once: that is why the buffer may come from allocUnsafe (gathering 8 MiB into a
   * zeroed buffer would cost a memset per write), and why the LU runs only then.
   */
  private startDataOut(task: Task): void {
    const immediate = task.pdu.data;
    const unsolicitedEnd = !this.params.initialR2T && !task.pdu.final ? Math.min(this.params.firstBurstLength, task.edtl) : immediate.length;
    if (unsolicitedEnd > immediate.length) task.unsolicited = { offset: 0, length: unsolicitedEnd, received: immediate.length, nextDataSN: 0 };
    task.solicitedTo = Math.max(unsolicitedEnd, immediate.length);
  }

  /** Count data held for a task waiting for admission; past the session's bound the command is answered BUSY instead. */
  private park(task: Task, bytes: number): boolean {
    if (this.parkedBytes + bytes > sessionParkedBytesMax) {
      task.failure = { status: ScsiStatus.busy };
      this.releaseParked(task);
      // Out of the line for bytes (it needs none now): answered once no data is owed for it.
      if (this.removeFromAdmitQueue(task)) this.admit(task);
      return false;
    }
    task.parkedBytes += bytes;
    this.parkedBytes += bytes;
    return true;
  }

  private releaseParked(task: Task): void {
    this.parkedBytes -= task.parkedBytes;
    task.parkedBytes = 0;
    task.parked = null;
  }

  // ---- admission: bytes before a command runs --------------------------------------------

  /** A delivered command asks for its bytes; failed commands need none. */
  private admit(task: Task): void {
    if (task.failure) {
      task.admitted = true;
      return this.maybeExecute(task);
    }
    this.admitQueue.push(task);
    this.pump();
  }

  /**
   * Admit waiting commands in order while their bytes fit the session's bound and the peer's
   * budget. Called when a command is delivered and whenever bytes come back (this session's or,
   * through the budget's line, another's). A single command always fits an empty session
   * (transferBytesMax ≤ sessionTaskBytesMax, transferBytesMax ≤ peerTaskBytesMax), so waiting
   * ends once the bytes taken come back; a session whose commands fit its guaranteed bytes
   * never waits for other sessions at all.
   */
  private pump(): void {
    if (this.pumping || this.ended) return;
    this.pumping = true;
    try {
      while (this.admitQueue.length > 0) {
        const task = this.admitQueue[0];
        const bytes = task.failure || task.aborted ? 0 : task.edtl;
        if (bytes > 0 && !this.take(task, bytes)) return;
        this.admitQueue.shift();
        this.admitted(task);
      }
      this.budget.leave(this.waiter);
    } finally {
      this.pumping = false;
    }
  }

  private take(task: Task, bytes: number): boolean {
    if (this.heldBytes + bytes > sessionTaskBytesMax) {
      // Our own bound: our own bytes coming back wake us; meanwhile keep no place in the peer's line.
      this.budget.leave(this.waiter);
      return false;
    }
    // The first sessionGuaranteedBytes of every session do not come from the shared budget: a
    // host with small commands goes on however much the hosts that do not read hold.
    const fromBudget = this.heldBytes - this.budgetBytes + bytes > sessionGuaranteedBytes;
    if (fromBudget && !this.budget.tryTake(bytes, this.waiter)) return false;
    task.chargedBytes = bytes;
    task.fromBudget = fromBudget;
    this.heldBytes += bytes;
    if (fromBudget) this.budgetBytes += bytes;
    return true;
  }

  private admitted(task: Task): void {
    task.admitted = true;
    if (task.pdu.write && task.edtl > 0 && !task.failure && !task.aborted) this.gather(task);
    this.issueR2ts(task);
    this.maybeExecute(task);
  }

  /** The write's buffer: the immediate data where it lies when it is all the data (a small write), else a copy of what came so far. */
  private gather(task: Task): void {
    const immediate = task.pdu.data;
    if (immediate.length === task.edtl) {
      task.buffer = immediate;
    } else {
      task.buffer = Buffer.allocUnsafe(task.edtl);
      immediate.copy(task.buffer, 0);
      let at = immediate.length;
      for (const part of task.parked ?? []) at += part.copy(task.buffer, at);
    }
    this.releaseParked(task);
  }

  private removeFromAdmitQueue(task: Task): boolean {
    const position = this.admitQueue.indexOf(task);
    if (position >= 0) this.admitQueue.splice(position, 1);
    return position >= 0;
  }

  /** Give back the task's bytes (idempotent): its buffer is dropped, or its read data has left. */
  private uncharge(task: Task): void {
    const bytes = task.chargedBytes;
    task.buffer = null;
    this.releaseParked(task);
    if (bytes === 0) return;
    task.chargedBytes = 0;
    this.heldBytes -= bytes;
    if (task.fromBudget) {
      this.budgetBytes -= bytes;
      this.budget.release(bytes);
    }
    this.pump();
  }

  /** A read's answer has left for the socket (or the connection is gone). */
  private flushed(task: Task): void {
    if (!this.awaitingFlush.delete(task)) return;
    this.flushes++;
    this.uncharge(task);
  }

  /** Send R2Ts for the rest of the data, at most MaxOutstandingR2T at a time, each ≤ MaxBurstLength. */
  private issueR2ts(task: Task): void {
    while (task.buffer && task.solicitedTo < task.edtl && task.r2tOutstanding.size < this.params.maxOutstandingR2T && !task.aborted && !task.failure) {
      const offset = task.solicitedTo;
      const length = Math.min(this.params.maxBurstLength, task.edtl - offset);
      const ttt = this.allocTtt();
      task.r2tOutstanding.set(ttt, { offset, length, received: 0, nextDataSN: 0 });
      task.solicitedTo += length;
      this.send({
        opcode: Op.r2t, immediate: false, final: true, initiatorTaskTag: task.itt, data: noData,
        lun: task.pdu.lun, targetTransferTag: ttt, statSN: this.statSN, expCmdSN: this.expCmdSN,
        maxCmdSN: this.windowEnd(), r2tSN: task.r2tSN++, bufferOffset: offset, desiredDataTransferLength: length,
      });
    }
  }

  private onDataOut(pdu: DataOutPdu): void {
    const task = this.tasks.get(pdu.initiatorTaskTag);
    // Data for a task that is gone (aborted, or answered) or already inside the LU is dropped.
    if (!task || task.executing) return;
    const sequence = pdu.targetTransferTag === reservedTag ? task.unsolicited : task.r2tOutstanding.get(pdu.targetTransferTag);
    if (!sequence) return this.onStrayDataOut(task, pdu);
    const failure = task.failure ? undefined : this.checkDataOut(sequence, pdu);
    if (failure) this.fail(task, failure, pdu);
    // Only a PDU that starts where the sequence stands and fits in it is ever written.
    else if (task.buffer) pdu.data.copy(task.buffer, pdu.bufferOffset);
    else if (!task.failure && this.park(task, pdu.data.length)) (task.parked ??= []).push(pdu.data);
    sequence.received += pdu.data.length;
    sequence.nextDataSN++;
    if (pdu.final || sequence.received >= sequence.length) this.endSequence(task, pdu.targetTransferTag);
    this.maybeExecute(task);
  }

  /** Why a Data-Out does not continue its sequence exactly (undefined: it does). */
  private checkDataOut(sequence: Sequence, pdu: DataOutPdu): ScsiResult | undefined {
    // DataSN counts from 0 within each sequence. At ErrorRecoveryLevel 0 nothing is repaired:
    // the command fails, the session goes on.
    if (pdu.dataSN !== sequence.nextDataSN) return dataPhaseError();
    if (pdu.bufferOffset !== sequence.offset + sequence.received) return dataOffsetError();
    const received = sequence.received + pdu.data.length;
    if (received > sequence.length) return incorrectAmountOfData();
    if (pdu.final && received < sequence.length) return incorrectAmountOfData();
    return undefined;
  }

  /** A Data-Out that belongs to no sequence of its task: unsolicited data not allowed, or a TTT we never gave. */
  private onStrayDataOut(task: Task, pdu: DataOutPdu): void {
    if (task.failure) return; // whatever else a failed task's initiator sends is dropped
    if (pdu.targetTransferTag === reservedTag) {
      this.fail(task, unexpectedUnsolicitedData(), pdu);
    } else {
      this.reject(RejectReason.protocolError, pdu);
      this.fail(task, invalidTtt(), pdu);
    }
    this.maybeExecute(task);
  }

  private endSequence(task: Task, ttt: number): void {
    if (ttt === reservedTag) task.unsolicited = null;
    else task.r2tOutstanding.delete(ttt);
    this.issueR2ts(task);
  }

  /** The command will not run: its data is dropped now, its answer waits for the data still owed. */
  private fail(task: Task, failure: ScsiResult, pdu: DataOutPdu): void {
    dataPhaseWarnings.warn(this.log, 'data-out', { itt: task.itt, ttt: pdu.targetTransferTag, dataSN: pdu.dataSN, bufferOffset: pdu.bufferOffset, bytes: pdu.data.length }, 'Data-Out outside its sequence, failing the command');
    task.failure = failure;
    this.uncharge(task);
  }

  /** Data the initiator may still send for the task: a sequence open, or (for a live write) R2Ts not yet issued. */
  private dataOwed(task: Task): boolean {
    return task.unsolicited !== null || task.r2tOutstanding.size > 0 || (task.buffer !== null && task.solicitedTo < task.edtl);
  }

  private maybeExecute(task: Task): void {
    if (!task.admitted || task.executing || task.aborted) return;
    // Nothing runs, and nothing is answered, while data is owed: a failed command answered
    // early lets the initiator reuse its ITT while its last Data-Outs are still on the way.
    if (this.dataOwed(task)) return;
    task.executing = true;
    if (task.failure) return this.complete(task, task.failure);
    const lu = this.luFor(task.lun);
    if (!lu) return this.complete(task, this.noSuchLun(task));
    lu.execute({
      cdb: task.pdu.cdb, lun: task.lun, nexus: this.opts.nexus, taskAttr: task.pdu.taskAttr,
      expectedDataLength: task.edtl, dataOut: task.buffer,
    }).then(
      (result) => this.complete(task, result),
      (err: unknown) => {
        this.log.error({ err, itt: task.itt }, 'logical unit failed a command');
        this.complete(task, check(SenseKey.hardwareError, Asc.internalTargetFailure));
      },
    );
  }

  private luFor(lun: number): LogicalUnit | undefined {
    return this.opts.target?.luns.get(lun);
  }

  /** INQUIRY and REPORT LUNS answer for any LUN (SPC-4); everything else gets LOGICAL UNIT NOT SUPPORTED. */
  private noSuchLun(task: Task): ScsiResult {
    const op = task.pdu.cdb[0];
    if (op === 0x12) return { status: ScsiStatus.good, dataIn: inquiryNoLun(task.pdu.cdb.readUInt16BE(3)) };
    return check(SenseKey.illegalRequest, Asc.logicalUnitNotSupported);
  }

  private complete(task: Task, result: ScsiResult): void {
    this.tasks.delete(task.itt);
    settle(task);
    const answered = !task.aborted && !this.ended;
    // A read's bytes stay taken until its data has left for the socket: a host that does not
    // read its answers holds its own bound, and its next commands wait.
    if (answered && task.chargedBytes > 0 && task.pdu.read && result.dataIn && result.dataIn.length > 0) {
      this.awaitingFlush.add(task);
      task.buffer = null;
      const data = result.dataIn;
      this.sendResult(task, result, () => {
        this.flushed(task);
        this.opts.readDataSent?.(data);
      });
    } else {
      this.uncharge(task);
      if (answered) this.sendResult(task, result);
    }
    this.notifyIdle();
  }

  /** `flushed` goes with the last PDU of the answer. */
  private sendResult(task: Task, result: ScsiResult, flushed?: () => void): void {
    const edtl = task.edtl;
    let residualBytes = 0;
    let overflow = false;
    let underflow = false;
    const dataIn = result.dataIn;
    let dataSN = 0;
    if (dataIn && task.pdu.read) {
      const sent = Math.min(dataIn.length, edtl);
      if (dataIn.length > edtl) {
        overflow = true;
        residualBytes = dataIn.length - edtl;
      } else if (dataIn.length < edtl) {
        underflow = true;
        residualBytes = edtl - dataIn.length;
      }
      const statusInData = result.status === ScsiStatus.good && !result.sense && sent > 0;
      dataSN = this.sendDataIn(task, dataIn.subarray(0, sent), statusInData ? { status: result.status, overflow, underflow, residualBytes } : undefined, statusInData ? flushed : undefined);
      if (statusInData) return;
    } else {
      const used = task.pdu.write ? (result.dataOutBytesUsed ?? (task.failure ? 0 : edtl)) : 0;
      if (used < edtl) {
        underflow = true;
        residualBytes = edtl - used;
      } else if (used > edtl) {
        overflow = true;
        residualBytes = used - edtl;
      }
    }
    let data: Buffer = noData;
    if (result.sense && result.sense.length > 0) {
      data = Buffer.allocUnsafe(2 + result.sense.length);
      data.writeUInt16BE(result.sense.length, 0);
      result.sense.copy(data, 2);
    }
    this.send({
      opcode: Op.scsiResponse, immediate: false, final: true, initiatorTaskTag: task.itt, data,
      bidiOverflow: false, bidiUnderflow: false, overflow, underflow,
      response: ScsiResponseCode.completed, status: result.status, snackTag: 0,
      statSN: this.nextStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.windowEnd(),
      expDataSN: task.pdu.read ? dataSN : task.r2tSN, bidiResidualCount: 0, residualCount: residualBytes,
    }, flushed);
  }

  /** Data-In PDUs of ≤ MaxXmitDataSegmentLength; F at the end of each MaxBurstLength sequence. Returns the PDU count. */
  private sendDataIn(task: Task, data: Buffer, status: { status: number; overflow: boolean; underflow: boolean; residualBytes: number } | undefined, flushed: (() => void) | undefined): number {
    const segment = this.params.maxXmitDataSegmentLength;
    const burst = this.params.maxBurstLength;
    let dataSN = 0;
    let offset = 0;
    while (offset < data.length) {
      const burstEnd = Math.min(data.length, (Math.floor(offset / burst) + 1) * burst);
      const end = Math.min(offset + segment, burstEnd);
      const last = end === data.length;
      const withStatus = last && status !== undefined;
      this.send({
        opcode: Op.dataIn, immediate: false, final: end === burstEnd, initiatorTaskTag: task.itt,
        data: data.subarray(offset, end), acknowledge: false,
        overflow: withStatus ? status.overflow : false, underflow: withStatus ? status.underflow : false,
        hasStatus: withStatus, status: withStatus ? status.status : 0, lun: task.pdu.lun,
        targetTransferTag: reservedTag, statSN: withStatus ? this.nextStatSN() : 0, expCmdSN: this.expCmdSN,
        maxCmdSN: this.windowEnd(), dataSN: dataSN++, bufferOffset: offset,
        residualCount: withStatus ? status.residualBytes : 0,
      }, last ? flushed : undefined);
      offset = end;
    }
    return dataSN;
  }

  // ---- NOP, text, task management, logout --------------------------------------------------

  private onNopOut(pdu: NopOutPdu): void {
    if (pdu.initiatorTaskTag === reservedTag) {
      // The answer to our ping (or a ping that wants no answer).
      if (this.ping && pdu.targetTransferTag === this.ping.ttt) this.ping = undefined;
      return;
    }
    this.send({
      opcode: Op.nopIn, immediate: false, final: true, initiatorTaskTag: pdu.initiatorTaskTag,
      data: Buffer.from(pdu.data.subarray(0, this.params.maxXmitDataSegmentLength)), lun: pdu.lun,
      targetTransferTag: reservedTag, statSN: this.nextStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.windowEnd(),
    });
  }

  private onText(pdu: TextRequestPdu): void {
    if (pdu.targetTransferTag !== reservedTag && this.textContinuation?.ttt === pdu.targetTransferTag) {
      return this.sendTextChunk(pdu.initiatorTaskTag, this.textContinuation.rest);
    }
    let whole: Buffer | undefined;
    let pairs: TextPairs;
    try {
      whole = this.text.add(pdu.data, pdu.continue);
      if (whole === undefined) return this.sendTextResponse(pdu.initiatorTaskTag, Buffer.alloc(0), false, this.allocTtt());
      pairs = parseTextKeys(whole);
    } catch {
      return this.reject(RejectReason.protocolError, pdu);
    }
    const answers: TextPairs = [];
    for (const [key, value] of pairs) {
      if (key === 'SendTargets') {
        answers.push(...sendTargetsAnswer(this.opts.directory, this.opts.initiatorName, value, this.opts.target));
      } else if (key === 'MaxRecvDataSegmentLength' && /^[0-9]+$/.test(value) && +value >= 512 && +value < 2 ** 24) {
        this.params.maxXmitDataSegmentLength = +value;
      } else {
        answers.push([key, 'NotUnderstood']);
      }
    }
    this.sendTextChunk(pdu.initiatorTaskTag, encodeTextKeys(answers));
  }

  /** Long answers go out in pieces: C bit + a TTT the initiator sends back to get the next one. */
  private sendTextChunk(itt: number, text: Buffer): void {
    const max = this.params.maxXmitDataSegmentLength;
    if (text.length <= max) {
      this.textContinuation = undefined;
      return this.sendTextResponse(itt, text, true, reservedTag);
    }
    const ttt = this.allocTtt();
    this.textContinuation = { ttt, rest: text.subarray(max), itt };
    this.sendTextResponse(itt, text.subarray(0, max), false, ttt, true);
  }

  private sendTextResponse(itt: number, data: Buffer, final: boolean, ttt: number, more = false): void {
    this.send({
      opcode: Op.textResponse, immediate: false, final, continue: more, initiatorTaskTag: itt, data, lun: lunZero,
      targetTransferTag: ttt, statSN: this.nextStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.windowEnd(),
    });
  }

  private async onTaskMgmt(pdu: TaskMgmtRequestPdu): Promise<void> {
    const response = await this.runTaskMgmt(pdu);
    if (this.ended) return;
    this.send({
      opcode: Op.taskMgmtResponse, immediate: false, final: true, initiatorTaskTag: pdu.initiatorTaskTag,
      data: Buffer.alloc(0), response, statSN: this.nextStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.windowEnd(),
    });
    if (pdu.function === TmfFunction.targetColdReset) this.io.close('target cold reset');
  }

  private async runTaskMgmt(pdu: TaskMgmtRequestPdu): Promise<number> {
    const lun = lunIndex(pdu.lun);
    const needsLun = pdu.function !== TmfFunction.targetWarmReset && pdu.function !== TmfFunction.targetColdReset;
    if (needsLun && !this.luFor(lun)) return TmfResponse.lunDoesNotExist;
    switch (pdu.function) {
      case TmfFunction.abortTask: {
        const task = this.tasks.get(pdu.referencedTaskTag);
        if (!task) {
          // RFC 7143 11.5.1: a task we have not received yet (RefCmdSN inside the CmdSN window,
          // before the TMF's own CmdSN) counts as received and aborted. One outside the window
          // was received and has ended: its response may already be on its way, so it "does
          // not exist" (answering "complete" would claim an abort of a command that ran).
          const notReceivedYet = !snLess(pdu.refCmdSN, this.expCmdSN) && !snLess(this.windowEnd(), pdu.refCmdSN);
          return notReceivedYet && (snLess(pdu.refCmdSN, pdu.cmdSN) || pdu.refCmdSN === pdu.cmdSN) ? TmfResponse.complete : TmfResponse.taskDoesNotExist;
        }
        await this.abort([task]);
        return TmfResponse.complete;
      }
      case TmfFunction.abortTaskSet:
      case TmfFunction.clearTaskSet:
        await this.abort([...this.tasks.values()].filter((t) => t.lun === lun));
        return TmfResponse.complete;
      case TmfFunction.logicalUnitReset:
        await this.abort([...this.tasks.values()].filter((t) => t.lun === lun));
        await this.luFor(lun)!.reset(this.opts.nexus);
        return TmfResponse.complete;
      case TmfFunction.targetWarmReset:
      case TmfFunction.targetColdReset:
        await this.abort([...this.tasks.values()]);
        for (const lu of this.opts.target?.luns.values() ?? []) await lu.reset(this.opts.nexus);
        return TmfResponse.complete;
      default:
        return TmfResponse.notSupported;
    }
  }

  /** Abort tasks: no response will be sent for them; resolves once none is still inside the LU. */
  private async abort(tasks: Task[]): Promise<void> {
    for (const task of tasks) {
      task.aborted = true;
      if (!task.executing) {
        // Never reached the LU: release it now.
        this.tasks.delete(task.itt);
        this.removeFromAdmitQueue(task);
        this.uncharge(task);
        settle(task);
      }
    }
    // A command that waited behind an aborted one for bytes may fit now.
    this.pump();
    await Promise.all(tasks.map(settled));
    this.notifyIdle();
  }

  private async onLogout(pdu: LogoutRequestPdu): Promise<void> {
    const recovery = pdu.reasonCode === LogoutReason.removeConnectionForRecovery;
    if (!recovery) {
      this.draining = true;
      // After a Logout the initiator sends nothing more on this connection (libiscsi corks
      // its socket), so a command still waiting for Data-Out or for an earlier CmdSN would
      // wait forever. Those end unanswered — the initiator re-issues them on its next session
      // (RFC 7143 11.14; libiscsi re-queues them) — while commands already inside the LU
      // finish and are answered BEFORE the Logout Response.
      await this.abort([...this.tasks.values()].filter((t) => !t.executing));
      this.pending.clear();
      await this.idle();
      // The nexus ends with this Logout: its RESERVE(6) reservation is released BEFORE the
      // response, so a host that logs in again (on any peer) right after finds it gone
      // (libiscsi's SCSI.Reserve6.Logout failed once through a second peer without this).
      await this.endNexus();
    }
    if (this.ended) return;
    this.send({
      opcode: Op.logoutResponse, immediate: false, final: true, initiatorTaskTag: pdu.initiatorTaskTag, data: Buffer.alloc(0),
      response: recovery ? LogoutResponseCode.recoveryNotSupported : LogoutResponseCode.success,
      statSN: this.nextStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.windowEnd(),
      time2Wait: this.params.defaultTime2Wait, time2Retain: this.params.defaultTime2Retain,
    });
    if (!recovery) this.io.close('logout');
  }

  /** Ask the initiator to log out within `seconds` (AsyncEvent 1): host balancing and graceful stop. */
  requestLogout(seconds: number): void {
    this.send({
      opcode: Op.asyncMessage, immediate: false, final: true, initiatorTaskTag: reservedTag, data: Buffer.alloc(0),
      lun: lunZero, statSN: this.nextStatSN(), expCmdSN: this.expCmdSN, maxCmdSN: this.windowEnd(),
      asyncEvent: AsyncEvent.requestLogout, asyncVCode: 0, parameter1: 0, parameter2: 0, parameter3: seconds,
    });
  }

  // ---- time, lifecycle --------------------------------------------------------------------

  /** Target-initiated NOP-In after idle time; a ping left unanswered past the timeout drops the connection. */
  tick(nowMs: number): void {
    if (this.ended) return;
    if (this.answersStalled(nowMs)) return this.io.close('answers not read');
    if (this.ping) {
      if (nowMs - this.ping.sentMs > nopTimeoutMs) this.io.close('no answer to NOP-In ping');
      return;
    }
    if (nowMs - this.lastRxMs < nopIdleMs) return;
    const ttt = this.allocTtt();
    this.ping = { ttt, sentMs: nowMs };
    this.send({
      opcode: Op.nopIn, immediate: false, final: true, initiatorTaskTag: reservedTag, data: Buffer.alloc(0), lun: lunZero,
      targetTransferTag: ttt, statSN: this.statSN, expCmdSN: this.expCmdSN, maxCmdSN: this.windowEnd(),
    });
  }

  /** Answers wait for the socket and none has left it for answerStallMsMax: the host is not reading. */
  private answersStalled(nowMs: number): boolean {
    if (this.awaitingFlush.size === 0 || this.flushes !== this.stall.flushes) {
      this.stall = { flushes: this.flushes, sinceMs: nowMs };
      return false;
    }
    return nowMs - this.stall.sinceMs > answerStallMsMax;
  }

  /** Stop taking commands and wait for those in flight. */
  async drain(): Promise<void> {
    this.draining = true;
    await this.idle();
  }

  /** The connection is gone: nothing more is sent; in-flight LU calls finish unseen. */
  destroy(): void {
    if (this.ended) return;
    this.ended = true;
    for (const task of this.tasks.values()) task.aborted = true;
    this.pending.clear();
    // Every byte goes back: tasks still in the LU keep only their own buffers until they return.
    this.admitQueue.length = 0;
    this.budget.leave(this.waiter);
    for (const task of [...this.tasks.values(), ...this.awaitingFlush]) this.uncharge(task);
    this.awaitingFlush.clear();
    void this.endNexus();
    this.notifyIdle();
  }

  /** Tell every LU the nexus is gone, once (at logout, or when the connection goes). */
  private endNexus(): Promise<unknown> {
    this.nexusEnded ??= Promise.all([...(this.opts.target?.luns.values() ?? [])].map((lu) => lu.nexusLost(this.opts.nexus)));
    return this.nexusEnded;
  }

  private idle(): Promise<void> {
    if (this.tasks.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private notifyIdle(): void {
    if (this.tasks.size > 0 && !this.ended) return;
    for (const resolve of this.idleWaiters.splice(0)) resolve();
  }

  // ---- helpers ----------------------------------------------------------------------------

  /**
   * Read data is counted in the budget until it has left for the socket (the caller's
   * `flushed`); every other answer is counted here until then: a host that sends NOP-Outs or
   * commands and never reads the answers is closed once they pass sessionAnswerBytesMax.
   */
  private send(pdu: TargetPdu, flushed?: () => void): void {
    if (this.ended) return;
    if (pdu.opcode === Op.dataIn || flushed) return this.io.send(pdu, flushed);
    const bytes = bhsBytes + pdu.data.length;
    this.answerBytes += bytes;
    this.io.send(pdu, () => (this.answerBytes -= bytes));
    if (this.answerBytes > sessionAnswerBytesMax) this.io.close('answers not read');
  }

  private nextStatSN(): number {
    const sn = this.statSN;
    this.statSN = (this.statSN + 1) >>> 0;
    return sn;
  }

  /** MaxCmdSN never moves back; it moves forward as tasks leave, keeping ≤ window tasks queued. */
  private windowEnd(): number {
    const room = Math.max(1, cmdWindowPerSession - this.tasks.size);
    const candidate = (this.expCmdSN + room - 1) >>> 0;
    if (snLess(this.maxCmdSN, candidate)) this.maxCmdSN = candidate;
    return this.maxCmdSN;
  }

  private allocTtt(): number {
    const ttt = this.nextTtt;
    this.nextTtt = this.nextTtt >= 0x7fffffff ? 1 : this.nextTtt + 1;
    return ttt;
  }
}
