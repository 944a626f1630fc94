// The I/O edge of one iSCSI connection: socket bytes → PduParser → LoginMachine, then
// Session; PDUs out → encodePdu → socket. Anything that goes wrong on one connection closes
// that connection only.
//
// Time bounds a connection that sends little (issue 15 item 4): in login, a complete PDU
// within loginPduGapMsMax of accept or of the previous one (a half-sent header stalls here)
// and the whole login within loginMsMax; a Discovery session, a request within
// discoveryIdleMsMax. A Normal session's silence is the Session's business (NOP-In pings).

import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import { discoveryIdleMsMax, loginMsMax, loginPduGapMsMax, maxRecvDataSegmentBytesMin, socketQueuedBytesMax } from '../limits';
import type { LogLimiter } from '../log';
import type { Nexus } from '../scsi/types';
import { LoginMachine, type LoginContext, type LoginOutcome } from './login';
import { PduParser, type ParseEvent } from './parser';
import { encodePdu } from './pdu';
import type { ByteBudget } from './budget';
import { Session } from './session';
import { Op, type InitiatorPdu, type TargetPdu } from './types';

export interface ConnectionHooks {
  loginContext: LoginContext;
  /** Called once login succeeds; returns false to refuse (the connection is then closed). */
  sessionStarted(conn: Connection, outcome: LoginOutcome): boolean;
  closed(conn: Connection): void;
  log: Logger;
  /** For warnings a hostile host can trigger on every connection. */
  limiter: LogLimiter;
}

const tickMs = 1000;

export class Connection {
  readonly socket: Socket;
  readonly remoteAddress: string;
  /** The peer's IP address alone: what per-source bounds count. */
  readonly sourceAddress: string;
  session: Session | undefined;
  outcome: LoginOutcome | undefined;
  private readonly hooks: ConnectionHooks;
  private readonly parser: PduParser;
  private readonly login: LoginMachine;
  private readonly log: Logger;
  private digests = { header: false, data: false };
  private corked = false;
  private closing = false;
  private closed = false;
  private readonly loginTimer: NodeJS.Timeout;
  /** Login: time since the last complete PDU; Discovery session: since the last request. */
  private quietTimer: NodeJS.Timeout;
  private lastPduMs: number;
  private tickTimer: NodeJS.Timeout | undefined;

  constructor(socket: Socket, hooks: ConnectionHooks) {
    this.socket = socket;
    this.hooks = hooks;
    this.sourceAddress = socket.remoteAddress ?? '';
    this.remoteAddress = `${this.sourceAddress}:${socket.remotePort}`;
    this.log = hooks.log.child({ remote: this.remoteAddress });
    // During login only small text PDUs are legal: 8192 is the RFC's default until negotiated.
    this.parser = new PduParser({ maxRecvDataSegmentBytes: Math.max(8192, maxRecvDataSegmentBytesMin), headerDigest: false, dataDigest: false });
    this.login = new LoginMachine(hooks.loginContext);
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.log.debug({ err }, 'socket error'));
    socket.on('close', () => this.onClose());
    socket.on('drain', () => socket.resume());
    this.lastPduMs = Date.now();
    this.loginTimer = setTimeout(() => this.destroy('login took too long'), loginMsMax);
    this.loginTimer.unref();
    this.quietTimer = this.quietAfter(loginPduGapMsMax);
  }

  get inFullFeaturePhase(): boolean {
    return this.session !== undefined;
  }

  /** How long this connection has gone without a complete PDU (the portal evicts stalled logins). */
  quietMs(nowMs: number): number {
    return nowMs - this.lastPduMs;
  }

  private quietAfter(ms: number): NodeJS.Timeout {
    const timer = setTimeout(() => this.onQuiet(), ms);
    timer.unref();
    return timer;
  }

  private onQuiet(): void {
    if (this.session) return this.destroy('discovery session idle');
    this.destroy(this.parser.hasPartial ? 'login PDU stalled half-sent' : 'no login PDU in time');
  }

  /** A PDU that shows the host is doing something: restarts the quiet timer (when one runs). */
  private noteActivity(pdu: InitiatorPdu, nowMs: number): void {
    this.lastPduMs = nowMs;
    if (this.session && (this.outcome?.sessionType !== 'Discovery' || pdu.opcode === Op.nopOut)) return;
    this.quietTimer.refresh();
  }

  private onData(chunk: Buffer): void {
    try {
      this.parser.push(chunk);
      for (let ev = this.parser.next(); ev && !this.closed; ev = this.parser.next()) this.onEvent(ev);
    } catch (err) {
      this.log.error({ err }, 'connection failed handling input');
      this.destroy('internal error');
    }
  }

  private onEvent(ev: ParseEvent): void {
    if (ev.kind === 'fatal') {
      this.hooks.limiter.warn(this.log, 'iscsi-protocol-error', { err: ev.error.message }, 'protocol error, dropping connection');
      return this.destroy(ev.error.message);
    }
    if (this.closing) return;
    if (ev.kind === 'reject') {
      if (!this.session) return this.destroy('malformed PDU during login');
      return this.session.rejectBhs(ev.reason, ev.bhs);
    }
    const pdu = ev.pdu as InitiatorPdu;
    const nowMs = Date.now();
    this.noteActivity(pdu, nowMs);
    if (this.session) return this.session.onPdu(pdu, nowMs);
    if (pdu.opcode !== Op.loginRequest) return this.destroy(`opcode 0x${pdu.opcode.toString(16)} before login completed`);
    const step = this.login.step(pdu);
    this.send(step.response);
    if (step.close) return this.end(`login refused (status 0x${step.response.status.toString(16).padStart(4, '0')})`);
    if (step.done) this.startSession(step.done);
  }

  private startSession(outcome: LoginOutcome): void {
    clearTimeout(this.loginTimer);
    clearTimeout(this.quietTimer);
    this.outcome = outcome;
    // The final login response went out with the old settings; everything after uses the new ones.
    this.digests = { header: outcome.params.headerDigest, data: outcome.params.dataDigest };
    this.parser.setDigests(outcome.params.headerDigest, outcome.params.dataDigest);
    this.parser.setMaxRecvDataSegmentBytes(outcome.params.maxRecvDataSegmentLength);
    if (!this.hooks.sessionStarted(this, outcome)) return this.end('session refused');
    this.tickTimer = setInterval(() => this.session?.tick(Date.now()), tickMs);
    this.tickTimer.unref();
    if (outcome.sessionType === 'Discovery') this.quietTimer = this.quietAfter(discoveryIdleMsMax);
  }

  /** Called by the portal from sessionStarted. */
  attachSession(nexus: Nexus, budget: ByteBudget, readDataSent?: (data: Buffer) => void): Session {
    const outcome = this.outcome!;
    this.session = new Session({
      sessionType: outcome.sessionType,
      initiatorName: outcome.initiatorName,
      target: outcome.target,
      directory: this.hooks.loginContext.directory,
      params: outcome.params,
      expCmdSN: outcome.expCmdSN,
      statSN: outcome.statSN,
      nexus,
      io: { send: (pdu, flushed) => this.send(pdu, flushed), close: (reason) => this.end(reason) },
      log: this.log,
      nowMs: Date.now(),
      budget,
      ...(readDataSent ? { readDataSent } : {}),
    });
    return this.session;
  }

  /**
   * Write a PDU. Everything sent in one turn of the event loop goes out in one writev: the
   * socket is uncorked in the check phase, after all the I/O callbacks of this turn (many
   * commands complete in the same poll phase under load).
   */
  send(pdu: TargetPdu, flushed?: () => void): void {
    if (this.closed) return flushed?.();
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    const chunks = encodePdu(pdu, this.digests);
    // Write callbacks run in order: the last chunk's says the whole PDU has left (or failed to).
    for (let i = 0; i < chunks.length - 1; i++) this.socket.write(chunks[i]);
    this.socket.write(chunks[chunks.length - 1], flushed);
    // Back-pressure: stop reading new commands while the initiator is not reading our answers.
    if (this.socket.writableLength > socketQueuedBytesMax) this.socket.pause();
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  /** Close after what was sent is flushed. */
  end(reason: string): void {
    if (this.closing || this.closed) return;
    this.closing = true;
    this.log.debug({ reason }, 'closing connection');
    this.socket.end();
    // A peer that never reads would keep the socket half-open: bound it.
    setTimeout(() => this.destroy('close timeout'), 5000).unref();
  }

  destroy(reason: string): void {
    if (this.closed) return;
    this.log.debug({ reason }, 'dropping connection');
    this.socket.destroy();
    this.onClose();
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.loginTimer);
    clearTimeout(this.quietTimer);
    if (this.tickTimer) clearInterval(this.tickTimer);
    this.session?.destroy();
    this.hooks.closed(this);
  }
}
