// Operational parameter negotiation (RFC 7143 sections 6.2 and 13). Each key has a kind that
// says how offer and answer combine; the target's preferences come from limits.ts. Pure.

import {
  firstBurstBytesDefault,
  maxBurstBytesDefault,
  maxBurstBytesMax,
  maxOutstandingR2tMax,
  maxRecvDataSegmentBytesDefault,
  maxRecvDataSegmentBytesMin,
} from '../limits';
import { assert } from '../errors';
import type { SessionParams } from './types';
import type { TextPairs } from './text';

export interface TargetPrefs {
  maxRecvDataSegmentLength: number;
  maxBurstLength: number;
  firstBurstLength: number;
  maxOutstandingR2T: number;
  immediateData: boolean;
  initialR2T: boolean;
  defaultTime2Wait: number;
  defaultTime2Retain: number;
  /** Digests we accept, in our order of preference. */
  digests: readonly string[];
}

export function defaultTargetPrefs(): TargetPrefs {
  return {
    maxRecvDataSegmentLength: maxRecvDataSegmentBytesDefault,
    maxBurstLength: maxBurstBytesDefault,
    firstBurstLength: firstBurstBytesDefault,
    maxOutstandingR2T: maxOutstandingR2tMax,
    immediateData: true,
    initialR2T: false,
    defaultTime2Wait: 2,
    defaultTime2Retain: 0,
    digests: ['None', 'CRC32C'],
  };
}

/** RFC 7143 defaults: what is in force for a key nobody negotiated. */
export function defaultSessionParams(): SessionParams {
  return {
    maxRecvDataSegmentLength: 8192,
    maxXmitDataSegmentLength: 8192,
    maxBurstLength: 262144,
    firstBurstLength: 65536,
    immediateData: true,
    initialR2T: true,
    maxOutstandingR2T: 1,
    dataPDUInOrder: true,
    dataSequenceInOrder: true,
    errorRecoveryLevel: 0,
    defaultTime2Wait: 2,
    defaultTime2Retain: 20,
    maxConnections: 1,
    headerDigest: false,
    dataDigest: false,
  };
}

type Kind = 'min' | 'max' | 'and' | 'or' | 'digest' | 'declareMrdsl';

interface KeySpec {
  kind: Kind;
  min?: number;
  max?: number;
  /** Applies the negotiated value to the session parameters. */
  apply: (p: SessionParams, v: string) => void;
  /** Our side of the negotiation, given what is agreed so far. */
  ours: (prefs: TargetPrefs, params: SessionParams) => string;
}

const yes = (v: string): boolean => v === 'Yes';
const yn = (b: boolean): string => (b ? 'Yes' : 'No');
const n24 = 16777215;

const operationalKeys: Record<string, KeySpec> = {
  HeaderDigest: { kind: 'digest', apply: (p, v) => (p.headerDigest = v === 'CRC32C'), ours: (s) => s.digests.join(',') },
  DataDigest: { kind: 'digest', apply: (p, v) => (p.dataDigest = v === 'CRC32C'), ours: (s) => s.digests.join(',') },
  MaxConnections: { kind: 'min', min: 1, max: 65535, apply: (p, v) => (p.maxConnections = +v), ours: () => '1' },
  InitialR2T: { kind: 'or', apply: (p, v) => (p.initialR2T = yes(v)), ours: (s) => yn(s.initialR2T) },
  ImmediateData: { kind: 'and', apply: (p, v) => (p.immediateData = yes(v)), ours: (s) => yn(s.immediateData) },
  MaxRecvDataSegmentLength: {
    kind: 'declareMrdsl', min: maxRecvDataSegmentBytesMin, max: n24,
    apply: (p, v) => (p.maxXmitDataSegmentLength = +v), ours: (s) => String(s.maxRecvDataSegmentLength),
  },
  MaxBurstLength: { kind: 'min', min: 512, max: n24, apply: (p, v) => (p.maxBurstLength = +v), ours: (s) => String(Math.min(s.maxBurstLength, maxBurstBytesMax)) },
  // RFC 7143 13.14: FirstBurstLength ≤ MaxBurstLength, so the MaxBurstLength in force (agreed or
  // the default) bounds our side: the answer is the value the session enforces.
  FirstBurstLength: {
    kind: 'min', min: 512, max: n24,
    apply: (p, v) => (p.firstBurstLength = +v), ours: (s, p) => String(Math.min(s.firstBurstLength, p.maxBurstLength)),
  },
  DefaultTime2Wait: { kind: 'max', min: 0, max: 3600, apply: (p, v) => (p.defaultTime2Wait = +v), ours: (s) => String(s.defaultTime2Wait) },
  DefaultTime2Retain: { kind: 'min', min: 0, max: 3600, apply: (p, v) => (p.defaultTime2Retain = +v), ours: (s) => String(s.defaultTime2Retain) },
  MaxOutstandingR2T: { kind: 'min', min: 1, max: 65535, apply: (p, v) => (p.maxOutstandingR2T = +v), ours: (s) => String(s.maxOutstandingR2T) },
  DataPDUInOrder: { kind: 'or', apply: (p, v) => (p.dataPDUInOrder = yes(v)), ours: () => 'Yes' },
  DataSequenceInOrder: { kind: 'or', apply: (p, v) => (p.dataSequenceInOrder = yes(v)), ours: () => 'Yes' },
  ErrorRecoveryLevel: { kind: 'min', min: 0, max: 2, apply: (p, v) => (p.errorRecoveryLevel = +v), ours: () => '0' },
  IFMarker: { kind: 'and', apply: () => undefined, ours: () => 'No' },
  OFMarker: { kind: 'and', apply: () => undefined, ours: () => 'No' },
};

/** Keys that declare something about the sender and need no answer. */
const declarativeKeys = new Set([
  'InitiatorName', 'InitiatorAlias', 'TargetName', 'SessionType', 'AuthMethod', 'TargetAlias',
  'TargetAddress', 'TargetPortalGroupTag',
]);
/** Keys that are Irrelevant once markers are off. */
const irrelevantKeys = new Set(['OFMarkInt', 'IFMarkInt']);

function numeric(v: string): number | undefined {
  if (!/^(0|[1-9][0-9]{0,9}|0x[0-9a-fA-F]{1,8})$/.test(v)) return undefined;
  return Number(v);
}

/** Negotiate one operational key; returns the answer value to send (or undefined: no answer). */
function negotiateKey(spec: KeySpec, offered: string, prefs: TargetPrefs, params: SessionParams): string | undefined {
  switch (spec.kind) {
    case 'digest': {
      const offers = offered.split(',');
      const pick = offers.find((o) => prefs.digests.includes(o));
      if (!pick) return 'Reject';
      spec.apply(params, pick);
      return pick;
    }
    case 'and':
    case 'or': {
      if (offered !== 'Yes' && offered !== 'No') return 'Reject';
      const ours = spec.ours(prefs, params) === 'Yes';
      const result = spec.kind === 'and' ? ours && yes(offered) : ours || yes(offered);
      spec.apply(params, yn(result));
      return yn(result);
    }
    case 'min':
    case 'max': {
      const n = numeric(offered);
      if (n === undefined || n < spec.min! || n > spec.max!) return 'Reject';
      const ours = Number(spec.ours(prefs, params));
      const result = spec.kind === 'min' ? Math.min(n, ours) : Math.max(n, ours);
      spec.apply(params, String(result));
      return String(result);
    }
    case 'declareMrdsl': {
      const n = numeric(offered);
      if (n === undefined || n < spec.min! || n > spec.max!) return 'Reject';
      spec.apply(params, String(n));
      return undefined; // we declare ours separately
    }
  }
}

export interface NegotiationRound {
  answers: TextPairs;
  /** Keys that were malformed in a way that fails the login (e.g. a key sent twice). */
  error?: string;
}

/**
 * Negotiate the operational keys of one login request; updates `params` and `seen` (keys
 * already negotiated in this login). Declarative and security keys are left to the caller.
 */
export function negotiateOperational(
  pairs: TextPairs,
  prefs: TargetPrefs,
  params: SessionParams,
  seen: Set<string>,
): NegotiationRound {
  const answers: TextPairs = [];
  for (const [key, value] of burstLimitFirst(pairs)) {
    if (declarativeKeys.has(key) || key.startsWith('CHAP_')) continue;
    if (seen.has(key)) return { answers, error: `key ${key} negotiated twice` };
    seen.add(key);
    if (irrelevantKeys.has(key)) {
      answers.push([key, 'Irrelevant']);
      continue;
    }
    const spec = operationalKeys[key];
    if (!spec) {
      answers.push([key, 'NotUnderstood']);
      continue;
    }
    const answer = negotiateKey(spec, value, prefs, params);
    if (answer !== undefined) answers.push([key, answer]);
    if (key === 'MaxBurstLength' && params.firstBurstLength > params.maxBurstLength) {
      // A FirstBurstLength answered in an earlier round cannot be taken back: the login fails.
      // One nobody negotiated is a default, and the RFC's relation lowers it.
      if (seen.has('FirstBurstLength')) return { answers, error: 'MaxBurstLength below the FirstBurstLength already agreed' };
      params.firstBurstLength = params.maxBurstLength;
    }
  }
  return { answers };
}

/** MaxBurstLength before FirstBurstLength, whatever order they came in (the one bounds the other). */
function burstLimitFirst(pairs: TextPairs): TextPairs {
  const rank = ([key]: [string, string]): number => (key === 'MaxBurstLength' ? 0 : 1);
  return [...pairs].sort((a, b) => rank(a) - rank(b));
}

/** After the last operational round: our declared MaxRecvDataSegmentLength applies. */
export function finishParams(params: SessionParams, prefs: TargetPrefs): SessionParams {
  params.maxRecvDataSegmentLength = prefs.maxRecvDataSegmentLength;
  // Negotiation keeps FirstBurst ≤ MaxBurst (the answers said so): a session past it would enforce something else.
  assert(params.firstBurstLength <= params.maxBurstLength, 'FirstBurstLength <= MaxBurstLength');
  return params;
}
