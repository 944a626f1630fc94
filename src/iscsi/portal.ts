// The iSCSI portal of one peer: accepts TCP connections, runs their logins, keeps the session
// table (TSIH allocation, session reinstatement, limits) and stops gracefully.
//
// Admission, in order (issue 15 item 4): at accept, the connections of the source address and
// the login-phase table (per source and in total; when full, the longest-stalled login
// connection gives its place, else the new one is dropped); at the end of login, BEFORE the
// final Login Response, room in the session table (Normal and Discovery sessions have separate
// budgets): a refusal answers Out Of Resources, never a success followed by a close.

import { randomBytes } from 'node:crypto';
import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import { assert, ClosedError } from '../errors';
import {
  connectionsPerSourceMax,
  discoverySessionsMax,
  gracefulStopMs,
  loginConnectionsMax,
  loginConnectionsPerSourceMax,
  loginStallEvictMs,
  peerTaskBytesMax,
  sessionsPerPeerMax,
} from '../limits';
import { LogLimiter } from '../log';
import type { Nexus } from '../scsi/types';
import { ByteBudget } from './budget';
import { Connection } from './connection';
import type { AdmissionRequest, LoginContext, LoginOutcome } from './login';
import { defaultTargetPrefs, type TargetPrefs } from './negotiate';
import type { Session } from './session';
import type { TargetDirectory } from './target';

export interface PortalOptions {
  host: string;
  port: number;
  directory: TargetDirectory;
  log: Logger;
  targetPrefs?: TargetPrefs;
  /** Normal sessions (Discovery sessions have their own discoverySessionsMax). */
  sessionsMax?: number;
  redirectFor?: LoginContext['redirectFor'];
  /** Told of every session that reached full feature phase (host balancing counts it from then on). */
  sessionStarted?(info: SessionInfo): void;
  /** Told of a READ's data once it has left for the socket (the peer reuses its buffer: src/routing/read-buffers.ts). */
  readDataSent?(data: Buffer): void;
}

export interface SessionInfo {
  tsih: number;
  initiatorName: string;
  isid: string;
  targetName: string;
  sessionType: 'Discovery' | 'Normal';
  remoteAddress: string;
  commandsInFlight: number;
}

interface LiveSession {
  tsih: number;
  outcome: LoginOutcome;
  conn: Connection;
  session: Session;
}

export class Portal {
  private readonly opts: PortalOptions;
  private readonly log: Logger;
  private readonly limiter = new LogLimiter();
  private readonly server: Server;
  private readonly connections = new Set<Connection>();
  /** Bytes of command data all sessions of this portal hold together. */
  private readonly budget = new ByteBudget(peerTaskBytesMax);
  private readonly sessionsByTsih = new Map<number, LiveSession>();
  private nextTsih = 1;
  private closing: Promise<void> | undefined;
  private listening = false;

  constructor(opts: PortalOptions) {
    this.opts = opts;
    this.log = opts.log.child({ component: 'portal' });
    this.server = createServer((socket) => this.onSocket(socket));
    this.server.on('error', (err) => this.log.error({ err }, 'portal server error'));
  }

  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.opts.port, this.opts.host, () => {
        this.server.off('error', reject);
        this.listening = true;
        resolve();
      });
    });
  }

  get address(): { host: string; port: number } {
    const a = this.server.address();
    if (a && typeof a === 'object') return { host: a.address, port: a.port };
    return { host: this.opts.host, port: this.opts.port };
  }

  sessions(): SessionInfo[] {
    return [...this.sessionsByTsih.values()].map((s) => this.info(s));
  }

  private info(s: LiveSession): SessionInfo {
    return {
      tsih: s.tsih,
      initiatorName: s.outcome.initiatorName,
      isid: s.outcome.isid.toString('hex'),
      targetName: s.outcome.target?.name ?? '',
      sessionType: s.outcome.sessionType,
      remoteAddress: s.conn.remoteAddress,
      commandsInFlight: s.session.commandsInFlight,
    };
  }

  /** Ask one session to log out within `seconds` (AsyncEvent 1); false if there is no such session. */
  requestLogoutOf(tsih: number, seconds: number): boolean {
    const s = this.sessionsByTsih.get(tsih);
    if (!s) return false;
    s.session.requestLogout(seconds);
    return true;
  }

  /** Ask every session on these targets to log out (AsyncEvent 1), e.g. before a volume goes away. */
  requestLogout(targetName: string, seconds: number): number {
    let n = 0;
    for (const s of this.sessionsByTsih.values()) {
      if (s.outcome.target?.name === targetName) {
        s.session.requestLogout(seconds);
        n++;
      }
    }
    return n;
  }

  private onSocket(socket: Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const source = socket.remoteAddress ?? '';
    const refusal = this.admitConnection(source, Date.now());
    if (refusal) {
      this.limiter.warn(this.log, refusal, { remote: source }, `${refusal}, refusing a connection`);
      socket.destroy();
      return;
    }
    const conn = new Connection(socket, {
      log: this.log,
      limiter: this.limiter,
      loginContext: this.loginContext(),
      sessionStarted: (c, outcome) => this.sessionStarted(c, outcome),
      closed: (c) => this.connectionClosed(c),
    });
    this.connections.add(conn);
  }

  /** Why a new connection from `source` is refused, or undefined (possibly after evicting a stalled login). */
  private admitConnection(source: string, nowMs: number): string | undefined {
    const fromSource = [...this.connections].filter((c) => c.sourceAddress === source);
    if (fromSource.length >= connectionsPerSourceMax) return 'too many connections from one address';
    const loggingIn = [...this.connections].filter((c) => !c.inFullFeaturePhase);
    const loggingInFromSource = fromSource.filter((c) => !c.inFullFeaturePhase);
    let full: Connection[] | undefined;
    if (loggingInFromSource.length >= loginConnectionsPerSourceMax) full = loggingInFromSource;
    else if (loggingIn.length >= loginConnectionsMax) full = loggingIn;
    if (!full) return undefined;
    const stalled = this.mostStalled(full, nowMs);
    if (!stalled) return 'too many connections in login';
    stalled.destroy('login stalled, place given to a new connection');
    return undefined;
  }

  /** The login connection quiet longest, if it has been quiet for loginStallEvictMs. */
  private mostStalled(conns: Connection[], nowMs: number): Connection | undefined {
    let most: Connection | undefined;
    for (const c of conns) {
      if (c.quietMs(nowMs) >= loginStallEvictMs && (!most || c.quietMs(nowMs) > most.quietMs(nowMs))) most = c;
    }
    return most;
  }

  private loginContext(): LoginContext {
    return {
      directory: this.opts.directory,
      targetParams: this.opts.targetPrefs ?? defaultTargetPrefs(),
      randomBytes: (n) => randomBytes(n),
      allocateTsih: () => this.allocateTsih(),
      sessionExists: (tsih) => this.sessionsByTsih.has(tsih),
      redirectFor: this.opts.redirectFor,
      admit: (who) => this.admitSession(who),
    };
  }

  /** Room for this session in its budget, counting the session it would reinstate as gone. */
  private admitSession(who: AdmissionRequest): boolean {
    if (this.closing) return false;
    const max = this.sessionsMaxOf(who.sessionType);
    const taken = this.sessionsOf(who.sessionType).filter((s) => !reinstates(who, s.outcome)).length;
    if (taken < max) return true;
    this.limiter.warn(this.log, `session-limit-${who.sessionType}`, { type: who.sessionType, max }, 'session limit reached, login refused (out of resources)');
    return false;
  }

  private sessionsMaxOf(type: 'Discovery' | 'Normal'): number {
    return type === 'Discovery' ? discoverySessionsMax : (this.opts.sessionsMax ?? sessionsPerPeerMax);
  }

  private sessionsOf(type: 'Discovery' | 'Normal'): LiveSession[] {
    return [...this.sessionsByTsih.values()].filter((s) => s.outcome.sessionType === type);
  }

  private allocateTsih(): number {
    for (let i = 0; i < 0xffff; i++) {
      const tsih = this.nextTsih;
      this.nextTsih = this.nextTsih >= 0xffff ? 1 : this.nextTsih + 1;
      if (!this.sessionsByTsih.has(tsih)) return tsih;
    }
    throw new Error('no free TSIH');
  }

  /** Called right after the final Login Response, in the same turn as admitSession said yes. */
  private sessionStarted(conn: Connection, outcome: LoginOutcome): boolean {
    if (this.closing) return false;
    const isidHex = outcome.isid.toString('hex');
    // Session reinstatement (RFC 7143 6.3.5): same initiator port and target, TSIH 0 → the old session ends.
    const who = { initiatorName: outcome.initiatorName, isid: outcome.isid, targetName: outcome.target?.name };
    for (const s of this.sessionsByTsih.values()) {
      if (reinstates(who, s.outcome)) {
        this.log.info({ initiator: outcome.initiatorName, isid: isidHex }, 'session reinstated');
        s.conn.destroy('session reinstated');
      }
    }
    assert(this.sessionsOf(outcome.sessionType).length < this.sessionsMaxOf(outcome.sessionType), 'a session admitted at login has room');
    const targetName = outcome.target?.name ?? '';
    const nexus: Nexus = {
      initiatorPort: `${outcome.initiatorName},i,0x${isidHex}`,
      initiatorName: outcome.initiatorName,
      targetPort: `${targetName},t,0x${this.opts.directory.portalGroupTag.toString(16).padStart(4, '0')}`,
      relativeTargetPort: this.opts.directory.portalGroupTag,
    };
    const session = conn.attachSession(nexus, this.budget, this.opts.readDataSent);
    const live: LiveSession = { tsih: outcome.tsih, outcome, conn, session };
    this.sessionsByTsih.set(outcome.tsih, live);
    this.opts.sessionStarted?.(this.info(live));
    this.log.info({ initiator: outcome.initiatorName, target: targetName, type: outcome.sessionType, tsih: outcome.tsih, remote: conn.remoteAddress }, 'session started');
    return true;
  }

  private connectionClosed(conn: Connection): void {
    this.connections.delete(conn);
    const tsih = conn.outcome?.tsih;
    if (tsih !== undefined && this.sessionsByTsih.get(tsih)?.conn === conn) {
      this.sessionsByTsih.delete(tsih);
      this.log.info({ initiator: conn.outcome!.initiatorName, tsih }, 'session ended');
    }
  }

  /** Stop accepting; let sessions finish the commands in flight; then close every connection. */
  close(): Promise<void> {
    if (!this.closing) this.closing = this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    const stopped = new Promise<void>((resolve) => (this.listening ? this.server.close(() => resolve()) : resolve()));
    const drains = [...this.sessionsByTsih.values()].map((s) => s.session.drain());
    const deadline = new Promise<void>((resolve) => setTimeout(resolve, gracefulStopMs).unref());
    await Promise.race([Promise.all(drains), deadline]);
    for (const conn of this.connections) conn.end('portal closing');
    await new Promise((r) => setTimeout(r, 50));
    for (const conn of this.connections) conn.destroy('portal closed');
    await stopped;
  }

  destroy(): void {
    if (!this.closing) this.closing = Promise.resolve();
    this.server.close();
    for (const conn of this.connections) conn.destroy('portal destroyed');
  }

  assertOpen(): void {
    if (this.closing) throw new ClosedError('portal is closing');
  }
}

/** Session reinstatement (RFC 7143 6.3.5): the same initiator port (name, ISID) to the same target. */
function reinstates(who: Omit<AdmissionRequest, 'sessionType'>, old: LoginOutcome): boolean {
  return old.initiatorName === who.initiatorName && old.isid.equals(who.isid) && old.target?.name === who.targetName;
}
