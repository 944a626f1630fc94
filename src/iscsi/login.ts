// The login phase of one connection (RFC 7143 section 6), as a pure state machine: one
// Login Request in, exactly one Login Response out. Security stage (AuthMethod None or CHAP,
// one-way or mutual), operational stage (negotiate.ts), then full feature phase. Any failure
// answers with a status and the connection is closed after it is sent.

import { cmdWindowPerSession } from '../limits';
import { chapAlgorithmMd5, chapChallengeBytes, chapResponse, chapResponseMatches, decodeChapBinary, encodeChapBinary } from './chap';
import { defaultSessionParams, finishParams, negotiateOperational, type TargetPrefs } from './negotiate';
import type { ChapCredentials, TargetDirectory, TargetInfo } from './target';
import { TextAccumulator, encodeTextKeys, parseTextKeys, type TextPairs } from './text';
import { LoginStatus, Op, Stage, type LoginRequestPdu, type LoginResponsePdu, type SessionParams } from './types';

export interface LoginContext {
  directory: TargetDirectory;
  targetParams: TargetPrefs;
  randomBytes(n: number): Buffer;
  /** Nonzero, unique among live sessions. */
  allocateTsih(): number;
  sessionExists(tsih: number): boolean;
  /**
   * Host balancing hook, asked at the first PDU of a Normal session: "host:port" or
   * "host:port,tpgt" (the destination's portal group) to answer Target Moved Temporarily (0x0101).
   */
  redirectFor?(initiatorName: string, targetName: string, isidHex: string): string | undefined;
  /**
   * Asked once, just before the final Login Response: may this session start (room in the
   * session table, the Discovery budget)? false answers Out Of Resources (0x0302) instead of
   * success, so a host never sees a successful login followed by a close.
   */
  admit?(who: AdmissionRequest): boolean;
}

export interface AdmissionRequest {
  sessionType: 'Discovery' | 'Normal';
  initiatorName: string;
  isid: Buffer;
  targetName?: string;
}

export interface LoginOutcome {
  sessionType: 'Discovery' | 'Normal';
  initiatorName: string;
  initiatorAlias?: string;
  target?: TargetInfo;
  isid: Buffer;
  tsih: number;
  params: SessionParams;
  /** The CmdSN the initiator uses next, and the StatSN we use next. */
  expCmdSN: number;
  statSN: number;
}

export interface LoginStep {
  response: LoginResponsePdu;
  done?: LoginOutcome;
  close?: boolean;
}

type ChapState = 'none' | 'wantAlgorithm' | 'wantResponse' | 'done';

export class LoginMachine {
  private readonly ctx: LoginContext;
  private readonly text = new TextAccumulator();
  private readonly params = defaultSessionParams();
  private readonly seen = new Set<string>();
  private first = true;
  private isid: Buffer = Buffer.alloc(6);
  private itt = 0;
  private expCmdSN = 0;
  private statSN = 0;
  private initiatorName = '';
  private initiatorAlias: string | undefined;
  private sessionType: 'Discovery' | 'Normal' = 'Normal';
  private target: TargetInfo | undefined;
  /** The stage both sides are in: where the first request starts, then only where the target answered T=1. */
  private stage: number = Stage.security;
  private authenticated = false;
  private chapState: ChapState = 'none';
  private chapId = 0;
  private chapChallenge: Buffer = Buffer.alloc(0);
  private mrdslDeclared = false;

  constructor(ctx: LoginContext) {
    this.ctx = ctx;
  }

  step(req: LoginRequestPdu): LoginStep {
    // The first request fixes who logs in; StatSN starts at random. Every later one must match.
    const opening = this.responsesSent === 0;
    if (opening) {
      this.isid = Buffer.from(req.isid);
      this.itt = req.initiatorTaskTag;
      this.expCmdSN = req.cmdSN;
      this.statSN = this.ctx.randomBytes(4).readUInt32BE(0) & 0x7fffffff;
      // The first request picks where the login starts (a continued one stays there).
      this.stage = req.csg;
    }
    if (req.versionMin > 0x00 || req.versionMax < 0x00) return this.fail(LoginStatus.unsupportedVersion);
    if (!opening && (req.initiatorTaskTag !== this.itt || !this.isid.equals(req.isid))) return this.fail(LoginStatus.initiatorError);
    if (!this.legalStages(req, opening)) return this.fail(LoginStatus.initiatorError);

    let whole: Buffer | undefined;
    try {
      whole = this.text.add(req.data, req.continue);
    } catch {
      return this.fail(LoginStatus.initiatorError);
    }
    if (whole === undefined) {
      // More text to come: acknowledge with an empty response, stay in the stage.
      return { response: this.respond(req.csg, req.csg, false, []) };
    }
    let pairs: TextPairs;
    try {
      pairs = parseTextKeys(whole);
    } catch {
      return this.fail(LoginStatus.initiatorError);
    }
    const keys = new Map(pairs);
    if (this.first) {
      const failure = this.leadingKeys(req, keys);
      if (failure !== undefined) return failure;
    }
    this.first = false;
    return req.csg === Stage.security ? this.securityStage(req, pairs, keys) : this.operationalStage(req, pairs);
  }

  /**
   * RFC 7143 6.3 and 11.12: the first request starts in the security or the operational stage;
   * later ones stay in the stage the target last answered (it moves only on its T=1). T asks
   * for a later stage (never 2), and T with C is illegal.
   */
  private legalStages(req: LoginRequestPdu, opening: boolean): boolean {
    if (req.csg !== Stage.security && req.csg !== Stage.operational) return false;
    if (!opening && req.csg !== this.stage) return false;
    if (req.transit && req.continue) return false;
    return !req.transit || (req.nsg !== 2 && req.nsg > req.csg);
  }

  /** Keys only the first request carries: who is logging in, to what, into which session. */
  private leadingKeys(req: LoginRequestPdu, keys: Map<string, string>): LoginStep | undefined {
    const name = keys.get('InitiatorName');
    if (!name) return this.fail(LoginStatus.missingParameter);
    this.initiatorName = name;
    this.initiatorAlias = keys.get('InitiatorAlias');
    const type = keys.get('SessionType') ?? 'Normal';
    if (type !== 'Normal' && type !== 'Discovery') return this.fail(LoginStatus.sessionTypeNotSupported);
    this.sessionType = type;
    if (req.tsih !== 0) {
      // MaxConnections=1: no connection may join an existing session.
      return this.fail(this.ctx.sessionExists(req.tsih) ? LoginStatus.tooManyConnections : LoginStatus.sessionDoesNotExist);
    }
    if (type === 'Discovery') return undefined;
    const targetName = keys.get('TargetName');
    if (!targetName) return this.fail(LoginStatus.missingParameter);
    this.target = this.ctx.directory.find(targetName);
    if (!this.target) return this.fail(LoginStatus.targetNotFound);
    const redirect = this.ctx.redirectFor?.(name, targetName, this.isid.toString('hex'));
    if (redirect) {
      const address = redirect.includes(',') ? redirect : `${redirect},${this.ctx.directory.portalGroupTag}`;
      return { response: this.respond(0, 0, false, [['TargetAddress', address]], LoginStatus.targetMovedTemporarily), close: true };
    }
    return undefined;
  }

  private credentials(): ChapCredentials | undefined {
    return this.sessionType === 'Discovery' ? this.ctx.directory.discoveryChap : this.target?.chap;
  }

  private authorized(): boolean {
    if (this.sessionType === 'Discovery' || !this.target) return true;
    return this.target.allow.length === 0 || this.target.allow.includes(this.initiatorName);
  }

  private securityStage(req: LoginRequestPdu, pairs: TextPairs, keys: Map<string, string>): LoginStep {
    const answers: TextPairs = [];
    const creds = this.credentials();
    if (this.chapState === 'none' && !this.authenticated) {
      const offered = keys.get('AuthMethod');
      if (offered === undefined) {
        if (creds) return this.fail(LoginStatus.authenticationFailure);
        this.authenticated = true;
      } else {
        const methods = offered.split(',');
        if (creds && methods.includes('CHAP')) {
          answers.push(['AuthMethod', 'CHAP']);
          this.chapState = 'wantAlgorithm';
        } else if (!creds && methods.includes('None')) {
          answers.push(['AuthMethod', 'None']);
          this.authenticated = true;
        } else {
          return this.fail(LoginStatus.authenticationFailure);
        }
      }
    } else if (this.chapState === 'wantAlgorithm') {
      const algorithms = (keys.get('CHAP_A') ?? '').split(',');
      if (!algorithms.includes(chapAlgorithmMd5)) return this.fail(LoginStatus.authenticationFailure);
      this.chapId = this.ctx.randomBytes(1)[0];
      this.chapChallenge = this.ctx.randomBytes(chapChallengeBytes);
      answers.push(['CHAP_A', chapAlgorithmMd5], ['CHAP_I', String(this.chapId)], ['CHAP_C', encodeChapBinary(this.chapChallenge)]);
      this.chapState = 'wantResponse';
    } else if (this.chapState === 'wantResponse') {
      const failure = this.verifyChap(keys, creds!, answers);
      if (failure) return failure;
    }
    if (this.authenticated && !this.authorized()) return this.fail(LoginStatus.authorizationFailure);
    // Operational keys sent early are negotiated right away (libiscsi and others do this).
    const round = negotiateOperational(pairs, this.ctx.targetParams, this.params, this.seen);
    if (round.error) return this.fail(LoginStatus.initiatorError);
    answers.push(...round.answers);
    const transit = req.transit && this.authenticated;
    return this.answer(req, transit, answers);
  }

  private verifyChap(keys: Map<string, string>, creds: ChapCredentials, answers: TextPairs): LoginStep | undefined {
    const user = keys.get('CHAP_N');
    const response = decodeChapBinary(keys.get('CHAP_R') ?? '');
    if (user !== creds.user) return this.fail(LoginStatus.authenticationFailure);
    if (!chapResponseMatches(chapResponse(this.chapId, creds.secret, this.chapChallenge), response)) {
      return this.fail(LoginStatus.authenticationFailure);
    }
    const mutualId = keys.get('CHAP_I');
    const mutualChallenge = keys.get('CHAP_C');
    if (mutualId !== undefined || mutualChallenge !== undefined) {
      const id = Number(mutualId);
      const challenge = decodeChapBinary(mutualChallenge ?? '');
      if (!creds.mutualUser || !creds.mutualSecret) return this.fail(LoginStatus.authenticationFailure);
      if (!/^[0-9]{1,3}$/.test(mutualId ?? '') || id > 255 || !challenge) return this.fail(LoginStatus.initiatorError);
      // A reflected challenge would let an attacker use us as an oracle for our own secret.
      if (challenge.equals(this.chapChallenge)) return this.fail(LoginStatus.authenticationFailure);
      answers.push(['CHAP_N', creds.mutualUser], ['CHAP_R', encodeChapBinary(chapResponse(id, creds.mutualSecret, challenge))]);
    }
    this.chapState = 'done';
    this.authenticated = true;
    return undefined;
  }

  private operationalStage(req: LoginRequestPdu, pairs: TextPairs): LoginStep {
    if (!this.authenticated) {
      // Skipping the security stage is only allowed when no authentication is required.
      if (this.credentials()) return this.fail(LoginStatus.authenticationFailure);
      this.authenticated = true;
      if (!this.authorized()) return this.fail(LoginStatus.authorizationFailure);
    }
    const round = negotiateOperational(pairs, this.ctx.targetParams, this.params, this.seen);
    if (round.error) return this.fail(LoginStatus.initiatorError);
    return this.answer(req, req.transit, round.answers);
  }

  /** Build the response for a successful round; finish the login when moving to full feature phase. */
  private answer(req: LoginRequestPdu, transit: boolean, answers: TextPairs): LoginStep {
    const nsg = transit ? req.nsg : req.csg;
    if (this.responsesSent === 0 && this.sessionType === 'Normal') {
      answers.push(['TargetPortalGroupTag', String(this.ctx.directory.portalGroupTag)]);
    }
    // Declare our MaxRecvDataSegmentLength once we are in (or entering) the operational stage.
    if (!this.mrdslDeclared && (req.csg === Stage.operational || (transit && nsg >= Stage.operational))) {
      answers.push(['MaxRecvDataSegmentLength', String(this.ctx.targetParams.maxRecvDataSegmentLength)]);
      this.mrdslDeclared = true;
    }
    const finishing = transit && nsg === Stage.fullFeature;
    if (finishing && !this.admitted()) return this.fail(LoginStatus.outOfResources);
    // TSIH only after admission: a refused login takes nothing from the session table.
    const tsih = finishing ? this.ctx.allocateTsih() : 0;
    const response = this.respond(req.csg, nsg, transit, answers, LoginStatus.success, tsih);
    this.stage = nsg;
    if (!finishing) return { response };
    return {
      response,
      done: {
        sessionType: this.sessionType,
        initiatorName: this.initiatorName,
        initiatorAlias: this.initiatorAlias,
        target: this.target,
        isid: this.isid,
        tsih,
        params: finishParams(this.params, this.ctx.targetParams),
        expCmdSN: this.expCmdSN,
        statSN: this.statSN,
      },
    };
  }

  private admitted(): boolean {
    if (!this.ctx.admit) return true;
    return this.ctx.admit({ sessionType: this.sessionType, initiatorName: this.initiatorName, isid: this.isid, targetName: this.target?.name });
  }

  private responsesSent = 0;

  private respond(csg: number, nsg: number, transit: boolean, answers: TextPairs, status: number = LoginStatus.success, tsih = 0): LoginResponsePdu {
    this.responsesSent++;
    const statSN = this.statSN;
    this.statSN = (this.statSN + 1) >>> 0;
    return {
      opcode: Op.loginResponse,
      immediate: false,
      final: transit,
      transit,
      continue: false,
      csg: status === LoginStatus.success ? csg : 0,
      nsg: status === LoginStatus.success && transit ? nsg : 0,
      versionMax: 0,
      versionActive: 0,
      isid: this.isid,
      tsih,
      initiatorTaskTag: this.itt,
      statSN,
      expCmdSN: this.expCmdSN,
      maxCmdSN: (this.expCmdSN + cmdWindowPerSession - 1) >>> 0,
      status,
      data: encodeTextKeys(answers),
    };
  }

  private fail(status: number): LoginStep {
    return { response: this.respond(0, 0, false, [], status), close: true };
  }
}
