// The cases of the fuzz suite (test/fuzz.test.ts). Each case draws everything from its own
// Rng, runs against the peers for a bounded time, closes what it opened, and returns the
// violations it saw itself (most cases have none of their own: the suite checks after them
// that the peers are alive, within their memory bound, and still serve a normal host).
//
// Data a case sends to the `fuzz` volume is drawn from `alphabet` only, so that a later read
// can tell bytes a case wrote (or zeros, never written) from bytes that came from somewhere
// else: a target that writes an uninitialised buffer shows as bytes outside the alphabet.
// Raw garbage goes to the `junk` volume, whose content nobody checks.

import { Op, TmfFunction, type Pdu } from '../../src/iscsi/types';
import { hostileAddress, lun0, RawIscsi, reservedTag, rw16 } from './fuzz-iscsi';
import { batchOf, openBlockStream, randomRequestFrame } from './fuzz-peer';
import { randomHttpRequest, sendHttp } from './fuzz-http';
import type { Rng } from './fuzz-rng';

export const alphabet: readonly number[] = [0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xeb, 0xec, 0xed, 0xee];
/** How long a case waits for answers it does not need (the peer may rightly never answer). */
const answerMs = 150;

export interface Violation {
  /** The issue-15 finding this violation is an instance of (0: not in the issue's list). */
  finding: number;
  message: string;
}

export interface CaseContext {
  /** iSCSI ports of the peers. */
  iscsiPorts: number[];
  rpcAddresses: string[];
  peerIds: string[];
  httpPorts: number[];
  secret: string;
  token: string;
  blockBytes: number;
  fuzz: { name: string; id: string; blocks: number };
  /** A volume whose pages are all on one peer (index `owner`): a frame there may span pages and be served. */
  solo: { id: string; blocks: number; owner: number };
  junk: { name: string };
  /** A session on `fuzz` that reads back what a case wrote (not fuzzed itself). */
  checker: () => Promise<RawIscsi>;
}

export type FuzzCase = (ctx: CaseContext, rng: Rng) => Promise<Violation[]>;

/** Connect and log in to `volume` with random (but legal) burst keys; undefined if the login failed. */
async function loginRandom(ctx: CaseContext, rng: Rng, volume: string): Promise<RawIscsi | undefined> {
  const c = await RawIscsi.connect(rng.pick(ctx.iscsiPorts), hostileAddress);
  const maxBurst = rng.pick([4096, 8192, 65536, 262144, 1048576]);
  const keys: Record<string, string> = {
    ImmediateData: rng.pick(['Yes', 'No']), InitialR2T: rng.pick(['Yes', 'No']), MaxBurstLength: String(maxBurst),
    FirstBurstLength: String(Math.min(maxBurst, rng.pick([512, 4096, 65536, 262144]))), MaxRecvDataSegmentLength: String(rng.pick([512, 8192, 262144])),
  };
  const r = await c.login({ volume, keys });
  if (r.ok) return c;
  c.close();
  return undefined;
}

// ---- login phase ------------------------------------------------------------------------

const loginKeys = ['InitiatorName', 'TargetName', 'SessionType', 'AuthMethod', 'CHAP_A', 'CHAP_N', 'CHAP_R', 'CHAP_I', 'CHAP_C', 'HeaderDigest', 'DataDigest', 'MaxRecvDataSegmentLength', 'MaxBurstLength', 'FirstBurstLength', 'InitialR2T', 'ImmediateData', 'MaxConnections', 'ErrorRecoveryLevel', 'TargetAlias', 'X-com.example', 'SendTargets', 'DefaultTime2Wait', 'MaxOutstandingR2T', 'OFMarker', 'TaskReporting'];
const loginValues = ['None', 'CHAP', 'CHAP,None', 'Yes', 'No', 'Normal', 'Discovery', '5', '0', '-1', '4294967296', '16777216', 'CRC32C', 'CRC32C,None', 'All', '0x' + 'ab'.repeat(40), '0b0101', '', 'x'.repeat(300), 'iqn.2026-11.io.peersan:fuzz', 'iqn.2026-11.io.peersan:nope', '\u00ff\u0001'];

function randomKeys(rng: Rng, ctx: CaseContext): Array<[string, string]> {
  const pairs: Array<[string, string]> = [];
  if (rng.chance(0.7)) pairs.push(['InitiatorName', 'iqn.2026-11.io.peersan.test:login'], ['TargetName', `iqn.2026-11.io.peersan:${rng.pick([ctx.fuzz.name, ctx.junk.name, 'nope'])}`]);
  const n = rng.range(0, 8);
  for (let i = 0; i < n; i++) pairs.push([rng.chance(0.9) ? rng.pick(loginKeys) : rng.bytes(rng.range(1, 10)).toString('latin1').replace(/[=\0]/g, 'k'), rng.chance(0.8) ? rng.pick(loginValues) : rng.bytes(rng.range(0, 40)).toString('latin1').replace(/\0/g, '')]);
  return pairs;
}

/** 1-4 login requests: random keys, random stage transitions, CHAP with broken answers, mutated headers. */
export const loginCase: FuzzCase = async (ctx, rng) => {
  const c = await RawIscsi.connect(rng.pick(ctx.iscsiPorts), hostileAddress);
  try {
    const steps = rng.range(1, 4);
    for (let i = 0; i < steps && !c.closed; i++) {
      const stage = { csg: rng.pick([0, 0, 1, 1, 2, 3]), nsg: rng.pick([0, 1, 1, 3, 3, 2]), transit: rng.chance(0.7) };
      let keys = randomKeys(rng, ctx);
      if (rng.chance(0.2)) keys = [['InitiatorName', 'iqn.x:y'], ['TargetName', `iqn.2026-11.io.peersan:${ctx.fuzz.name}`], ['AuthMethod', 'CHAP'], ['CHAP_A', rng.pick(['5', '7', '5,7', '']) ], ['CHAP_N', 'x'], ['CHAP_R', rng.pick(['0x00', '0x' + 'ff'.repeat(16), 'zz', ''])]];
      const pdu = RawIscsi.encode(c.loginPdu(keys, stage, rng.u32()));
      c.writeRaw(rng.chance(0.3) ? rng.mutate(pdu) : pdu);
      await c.next(answerMs);
    }
    // Something other than a login before full feature phase.
    if (rng.chance(0.3)) c.send(c.command(rw16(0x88, 0, 1), { read: true, edtl: 512 }));
    await c.next(answerMs);
  } finally {
    c.close();
  }
  return [];
};

/** A Discovery session: SendTargets and random text, then maybe a command (not allowed there). */
export const discoveryCase: FuzzCase = async (ctx, rng) => {
  const c = await RawIscsi.connect(rng.pick(ctx.iscsiPorts), hostileAddress);
  try {
    const r = await c.login({ keys: {} });
    if (!r.ok) return [];
    const text = Buffer.from(rng.chance(0.7) ? 'SendTargets=All\0' : randomKeys(rng, ctx).map(([k, v]) => `${k}=${v}\0`).join(''), 'latin1');
    c.send({ opcode: Op.textRequest, immediate: true, final: rng.chance(0.9), initiatorTaskTag: c.itt(), data: text, continue: rng.chance(0.1), lun: lun0, targetTransferTag: rng.pick([reservedTag, rng.u32()]), cmdSN: c.cmdSN, expStatSN: c.expStatSN });
    if (rng.chance(0.3)) c.send(c.command(rw16(0x88, 0, 1), { read: true, edtl: 512 }));
    await c.next(answerMs);
  } finally {
    c.close();
  }
  return [];
};

// ---- full feature phase -----------------------------------------------------------------

const opcodes = [0x00, 0x03, 0x08, 0x0a, 0x12, 0x1a, 0x1b, 0x25, 0x28, 0x2a, 0x2f, 0x35, 0x41, 0x42, 0x4d, 0x55, 0x5a, 0x5e, 0x5f, 0x83, 0x84, 0x88, 0x89, 0x8a, 0x8f, 0x91, 0x93, 0x9e, 0xa0, 0xa3, 0xff];
const cdbBytes = (op: number): number => (op < 0x20 ? 6 : op < 0x60 ? 10 : op >= 0x80 && op < 0xa0 ? 16 : 12);

function randomCdb(ctx: CaseContext, rng: Rng): Buffer {
  const op = rng.pick(opcodes);
  const cdb = rng.chance(0.5) ? Buffer.alloc(cdbBytes(op)) : rng.bytes(cdbBytes(op));
  cdb[0] = op;
  // An in-range LBA and a small length half of the time, so that commands get past the range checks.
  if (cdb.length === 16 && rng.chance(0.5)) {
    cdb.writeUInt32BE(0, 2);
    cdb.writeUInt32BE(rng.int(ctx.fuzz.blocks), 6);
    cdb.writeUInt32BE(rng.pick([0, 1, 8, 2048, 16384, 0xffffffff]), 10);
  }
  return rng.chance(0.05) ? Buffer.concat([cdb, rng.bytes(rng.range(1, 40))]) : cdb;
}

/**
 * 1-20 SCSI commands with random CDBs, EDTLs, flags, immediate bits, CmdSNs and task tags;
 * answers not read. PERSISTENT RESERVE goes to the `junk` volume only: a reservation outlives
 * the session and would lock the read-back checks out of `fuzz`.
 */
export const commandCase: FuzzCase = async (ctx, rng) => {
  const onJunk = rng.chance(0.3);
  const c = await loginRandom(ctx, rng, onJunk ? ctx.junk.name : ctx.fuzz.name);
  if (!c) return [];
  try {
    const n = rng.range(1, 20);
    const itts: number[] = [];
    for (let i = 0; i < n && !c.closed; i++) {
      const edtl = rng.pick([0, 512, 4096, 65536, 1 << 20, 8 << 20, rng.u32Edge()]);
      const dataBytes = rng.pick([0, 0, 512, Math.min(edtl, 65536), rng.range(1, 9000)]);
      const itt = itts.length > 0 && rng.chance(0.1) ? rng.pick(itts) : c.itt();
      itts.push(itt);
      const cmdSN = rng.chance(0.8) ? undefined : rng.pick([c.cmdSN + 1000, c.cmdSN - 1, rng.u32()]) >>> 0;
      const cdb = randomCdb(ctx, rng);
      if (!onJunk && (cdb[0] === 0x5e || cdb[0] === 0x5f)) continue;
      const pdu = c.command(cdb, { read: rng.chance(0.5), write: rng.chance(0.5), edtl, data: rng.bytesFrom(dataBytes, alphabet), immediate: rng.chance(0.15), itt, cmdSN });
      c.send(pdu);
    }
    await c.next(answerMs, () => false);
    c.drain();
  } finally {
    c.close();
  }
  return [];
};

/** How a Data-Out sequence is broken (or not: 'none' is the control that must succeed). */
type SequenceFault = 'none' | 'overlap' | 'gap' | 'beyond' | 'dataSN' | 'unknownTtt' | 'earlyFinal' | 'unknownItt';
/** Faults after which the command must not succeed (RFC 7143 11.4.7.2; issue 15 item 1). */
const breaksTask = new Set<SequenceFault>(['overlap', 'gap', 'beyond', 'dataSN', 'unknownTtt', 'earlyFinal']);

/**
 * The Data-Out PDUs answering one R2T (or the unsolicited burst), with `fault` applied, and
 * whether it could be (a gap needs more than one block, an early F bit more than one PDU).
 */
function burst(c: RawIscsi, itt: number, ttt: number, offset: number, length: number, data: Buffer, fault: SequenceFault, rng: Rng): { pdus: Pdu[]; applied: boolean } {
  const chunk = Math.max(512, Math.min(c.targetRecvBytes, rng.chance(0.5) ? 4096 : c.targetRecvBytes));
  const spans: Array<[number, number]> = [];
  for (let at = offset; at < offset + length; at += chunk) spans.push([at, Math.min(chunk, offset + length - at)]);
  let applied = fault !== 'none' && fault !== 'unknownItt';
  // Issue 15 item 1: the first half sent twice, the second half never (as many bytes in
  // total). No prefix of the sequence covers the R2T, so no target can rightly finish early.
  if (fault === 'overlap' && spans.length === 1) spans.splice(0, 1, [offset, Math.ceil(length / 2)], [offset + Math.ceil(length / 2), length - Math.ceil(length / 2)]);
  if (fault === 'overlap') {
    const half = spans.slice(0, Math.ceil(spans.length / 2));
    spans.splice(0, spans.length, ...half, ...half);
  }
  if (fault === 'gap' && spans.length >= 2) spans.splice(rng.int(spans.length - 1), 1);
  else if (fault === 'gap' && spans[0][1] > 512) spans[0] = [spans[0][0], Math.floor(spans[0][1] / 1024) * 512];
  else if (fault === 'gap') applied = false;
  if (fault === 'beyond') {
    const [at, n] = spans[spans.length - 1];
    spans[spans.length - 1] = [at, n + rng.pick([512, 4096, chunk])];
  }
  // The F bit before the R2T's end, and nothing after it: at ErrorRecoveryLevel=0 the rest is never asked for again.
  if (fault === 'earlyFinal' && spans.length >= 2) spans.splice(rng.range(1, spans.length - 1));
  else if (fault === 'earlyFinal') applied = false;
  const wrongSn = fault === 'dataSN' ? rng.int(spans.length) : -1;
  const t = fault === 'unknownTtt' ? (ttt ^ 0x5a5a) >>> 0 : ttt;
  const pdus = spans.map(([at, n], sn) => {
    const bytes = at + n <= data.length ? data.subarray(at, at + n) : rng.bytesFrom(n, alphabet);
    return c.dataOut(itt, t, sn === wrongSn ? sn + rng.range(1, 3) : sn, at, bytes, sn === spans.length - 1);
  });
  return { pdus, applied };
}

/**
 * A WRITE answered with a Data-Out sequence that has one fault (overlap, gap, beyond the R2T,
 * wrong DataSN, unknown TTT, early F bit, extra PDUs for an unknown task, or none). A broken
 * sequence must not end in GOOD; whatever ends in GOOD must read back as written or zeros.
 */
export const dataOutCase: FuzzCase = async (ctx, rng) => {
  const c = await loginRandom(ctx, rng, ctx.fuzz.name);
  if (!c) return [];
  const fault = rng.pick<SequenceFault>(['none', 'overlap', 'overlap', 'gap', 'beyond', 'dataSN', 'unknownTtt', 'earlyFinal', 'unknownItt']);
  const blocks = rng.pick([1, 8, 64, 512, 2048, rng.range(1, 2048)]);
  const lba = rng.int(ctx.fuzz.blocks - blocks);
  const data = rng.bytesFrom(blocks * ctx.blockBytes, alphabet);
  const violations: Violation[] = [];
  try {
    // The fault goes into one burst: the first R2T's, or the unsolicited one.
    const immediateBytes = c.immediateData ? Math.min(data.length, c.firstBurstBytes, c.targetRecvBytes) : 0;
    const cmd = c.command(rw16(0x8a, lba, blocks), { write: true, edtl: data.length, data: data.subarray(0, immediateBytes) });
    const itt = cmd.initiatorTaskTag;
    c.send(cmd);
    let faultLeft = fault;
    /** The fault that changed the sequence ('none' if it could not be applied). */
    let applied: SequenceFault = fault === 'unknownItt' ? fault : 'none';
    const send = (b: { pdus: Pdu[]; applied: boolean }): void => {
      b.pdus.forEach((p) => c.send(p));
      if (b.applied) applied = faultLeft;
      faultLeft = 'none';
    };
    const unsolicitedEnd = c.initialR2T ? immediateBytes : Math.min(data.length, c.firstBurstBytes);
    if (unsolicitedEnd > immediateBytes) send(burst(c, itt, reservedTag, immediateBytes, unsolicitedEnd - immediateBytes, data, faultLeft === 'unknownItt' ? 'none' : faultLeft, rng));
    let status: number | undefined;
    for (let r2ts = 0; r2ts < 4096 && status === undefined; r2ts++) {
      const p = await c.next(500, (q) => q.initiatorTaskTag === itt && (q.opcode === Op.r2t || q.opcode === Op.scsiResponse || q.opcode === Op.reject));
      if (!p) break;
      if (p.opcode === Op.r2t) {
        if (faultLeft === 'unknownItt') c.send(c.dataOut((itt + 77) >>> 0, p.targetTransferTag, 0, p.bufferOffset, rng.bytesFrom(512, alphabet), true));
        send(burst(c, itt, p.targetTransferTag, p.bufferOffset, p.desiredDataTransferLength, data, faultLeft === 'unknownItt' ? 'none' : faultLeft, rng));
      } else {
        status = p.opcode === Op.scsiResponse ? p.status : -1;
      }
    }
    // A faulty PDU the target refused outright (a Reject: e.g. a data segment over its
    // MaxRecvDataSegmentLength) never joined the sequence: the command may then rightly end in
    // GOOD once the data comes whole (what it wrote is still checked below).
    const refusedOutright = status === 0 && (await c.next(0, (q) => q.opcode === Op.reject && q.data.length >= 48 && (q.data[0] & 0x3f) === Op.dataOut && q.data.readUInt32BE(16) === itt)) !== undefined;
    if (status === 0 && breaksTask.has(applied) && !refusedOutright) violations.push({ finding: 1, message: `WRITE ${blocks} blocks at ${lba} answered GOOD after a Data-Out sequence with fault '${applied}'` });
    if (status === 0) violations.push(...(await readBack(ctx, lba, data, applied)));
    if (!breaksTask.has(applied) && status !== 0 && status !== undefined) violations.push({ finding: 0, message: `well-formed WRITE ${blocks} blocks at ${lba} answered status ${status}` });
  } finally {
    c.close();
  }
  return violations;
};

/** After a GOOD write: a well-formed one reads back exactly; any other holds only bytes a case wrote, or zeros. */
async function readBack(ctx: CaseContext, lba: number, data: Buffer, fault: SequenceFault): Promise<Violation[]> {
  const checker = await ctx.checker();
  const r = await checker.readBlocks(lba, data.length / ctx.blockBytes, ctx.blockBytes);
  if (!r || r.status !== 0) return [{ finding: 0, message: `read-back of ${data.length} bytes at ${lba} failed (${r ? `status ${r.status}` : 'no answer'})` }];
  if (fault === 'none' || fault === 'unknownItt') return r.data.equals(data) ? [] : [{ finding: 0, message: `well-formed WRITE at ${lba} read back different` }];
  const ok = new Set([0, ...alphabet]);
  const foreign = r.data.findIndex((b) => !ok.has(b));
  return foreign < 0 ? [] : [{ finding: 1, message: `WRITE at ${lba} (fault '${fault}') stored bytes nobody wrote: byte ${foreign} of the range is 0x${r.data[foreign].toString(16)}` }];
}

/** WRITE with only the R flag, READ with only the W flag: must not answer GOOD (issue 15 item 8). */
export const flagMismatchCase: FuzzCase = async (ctx, rng) => {
  const c = await loginRandom(ctx, rng, ctx.fuzz.name);
  if (!c) return [];
  try {
    const write = rng.chance(0.5);
    const lba = rng.int(ctx.fuzz.blocks - 8);
    const edtl = 8 * ctx.blockBytes;
    const pdu = write
      ? c.command(rw16(0x8a, lba, 8), { read: true, edtl, data: rng.bytesFrom(Math.min(edtl, c.targetRecvBytes, c.firstBurstBytes), alphabet) })
      : c.command(rw16(0x88, lba, 8), { write: true, edtl });
    c.send(pdu);
    const r = await c.result(pdu.initiatorTaskTag, edtl, 1_000);
    return r?.status === 0 ? [{ finding: 8, message: `${write ? 'WRITE with only the R flag' : 'READ with only the W flag'} answered GOOD` }] : [];
  } finally {
    c.close();
  }
};

/**
 * Negotiated values the target must hold to (issue 15 item 8): no immediate data when
 * ImmediateData=No, none beyond FirstBurstLength, FirstBurstLength ≤ MaxBurstLength in its
 * answer, and no return to the security stage once it moved on. Each variant has one oracle.
 */
export const negotiationCase: FuzzCase = async (ctx, rng) => {
  const variant = rng.int(4);
  if (variant === 3) return stageBack(ctx, rng);
  const variants: Array<Record<string, string>> = [
    { ImmediateData: 'No', InitialR2T: 'Yes' },
    { ImmediateData: 'Yes', InitialR2T: 'Yes', FirstBurstLength: '512' },
    { MaxBurstLength: '4096', FirstBurstLength: '262144' },
  ];
  const keys = variants[variant];
  const c = await RawIscsi.connect(rng.pick(ctx.iscsiPorts), hostileAddress);
  try {
    const login = await c.login({ volume: ctx.fuzz.name, keys });
    if (!login.ok) return [];
    if (variant === 2) {
      const [first, max] = [Number(login.keys.get('FirstBurstLength') ?? 65536), Number(login.keys.get('MaxBurstLength') ?? 262144)];
      return first > max ? [{ finding: 8, message: `asked MaxBurstLength=4096 FirstBurstLength=262144, the target answered FirstBurstLength=${first} > MaxBurstLength=${max}` }] : [];
    }
    // 4 KiB of immediate data that was not negotiated (or beyond the 512-byte first burst); no R2T is answered.
    const data = rng.bytesFrom(8 * ctx.blockBytes, alphabet);
    const pdu = c.command(rw16(0x8a, rng.int(ctx.fuzz.blocks - 8), 8), { write: true, edtl: data.length, data });
    c.send(pdu);
    const r = await c.result(pdu.initiatorTaskTag, 0, 1_000);
    return r?.status === 0 ? [{ finding: 8, message: `a WRITE with 4096 bytes of immediate data answered GOOD with ${variant === 0 ? 'ImmediateData=No' : 'FirstBurstLength=512'}` }] : [];
  } finally {
    c.close();
  }
};

/** Security stage done (CSG 0 → 1), then a login request back in CSG 0: must not succeed. */
async function stageBack(ctx: CaseContext, rng: Rng): Promise<Violation[]> {
  const c = await RawIscsi.connect(rng.pick(ctx.iscsiPorts), hostileAddress);
  try {
    const keys: Array<[string, string]> = [['InitiatorName', 'iqn.2026-11.io.peersan.test:stage'], ['TargetName', `iqn.2026-11.io.peersan:${ctx.fuzz.name}`], ['SessionType', 'Normal'], ['AuthMethod', 'None']];
    const r1 = await c.loginStep(keys, { csg: 0, nsg: 1, transit: true }, 2_000);
    if (!r1.ok) return [];
    const r2 = await c.loginStep([['AuthMethod', 'None']], { csg: 0, nsg: rng.pick([1, 3]), transit: true }, 2_000);
    return r2.ok ? [{ finding: 8, message: 'a login request back in CSG=0 after the operational stage was reached was answered with success' }] : [];
  } finally {
    c.close();
  }
}

/** NOP-Out, SNACK, task management, Text, Logout and unknown opcodes with random fields, around a command in progress. */
export const miscCase: FuzzCase = async (ctx, rng) => {
  const c = await loginRandom(ctx, rng, ctx.fuzz.name);
  if (!c) return [];
  try {
    // A command in progress for the TMFs and SNACKs to name (a WRITE waiting for its data).
    const pending = c.command(rw16(0x8a, rng.int(ctx.fuzz.blocks - 64), 64), { write: true, edtl: 64 * ctx.blockBytes });
    c.send(pending);
    const n = rng.range(1, 10);
    for (let i = 0; i < n && !c.closed; i++) c.writeRaw(RawIscsi.encode(randomMiscPdu(c, rng, pending.initiatorTaskTag)));
    await c.next(answerMs, () => false);
    c.drain();
  } finally {
    c.close();
  }
  return [];
};

function randomMiscPdu(c: RawIscsi, rng: Rng, pendingItt: number): Pdu {
  const itt = rng.chance(0.2) ? pendingItt : c.itt();
  const ref = rng.pick([pendingItt, rng.u32(), reservedTag]);
  const data = rng.chance(0.3) ? rng.bytesFrom(rng.range(1, 4096), alphabet) : Buffer.alloc(0);
  switch (rng.int(5)) {
    case 0:
      return c.nopOut({ itt: rng.pick([itt, reservedTag]), ttt: rng.pick([reservedTag, rng.u32()]), immediate: rng.chance(0.5), data });
    case 1:
      return { opcode: Op.snack, immediate: false, final: true, initiatorTaskTag: ref, data, type: rng.int(16), lun: lun0, targetTransferTag: rng.u32Edge(), expStatSN: c.expStatSN, begRun: rng.u32Edge(), runLength: rng.u32Edge() };
    case 2:
      return {
        opcode: Op.taskMgmtRequest, immediate: rng.chance(0.7), final: true, initiatorTaskTag: itt, data, function: rng.chance(0.8) ? rng.pick(Object.values(TmfFunction)) : rng.int(128),
        lun: rng.chance(0.8) ? lun0 : rng.bytes(8), referencedTaskTag: ref, cmdSN: c.cmdSN, expStatSN: c.expStatSN, refCmdSN: rng.u32Edge(), expDataSN: rng.u32Edge(),
      };
    case 3:
      return { opcode: Op.textRequest, immediate: rng.chance(0.5), final: rng.chance(0.8), initiatorTaskTag: itt, data: Buffer.from(rng.pick(['SendTargets=All\0', 'MaxBurstLength=512\0', 'X-a=b\0', 'bad\0', '']), 'latin1'), continue: rng.chance(0.2), lun: lun0, targetTransferTag: rng.pick([reservedTag, rng.u32()]), cmdSN: c.cmdSN, expStatSN: c.expStatSN };
    default:
      return { opcode: Op.logoutRequest, immediate: rng.chance(0.5), final: true, initiatorTaskTag: itt, data, reasonCode: rng.int(4), cid: rng.int(3), cmdSN: c.cmdSN, expStatSN: c.expStatSN };
  }
}

/** Raw bytes: random, a header cut short, a header announcing a huge segment, a valid PDU mutated; before or after login. */
export const garbageCase: FuzzCase = async (ctx, rng) => {
  const loggedIn = rng.chance(0.5);
  const c = loggedIn ? await loginRandom(ctx, rng, ctx.junk.name) : await RawIscsi.connect(rng.pick(ctx.iscsiPorts), hostileAddress);
  if (!c) return [];
  try {
    const kind = rng.int(5);
    if (kind === 0) c.writeRaw(rng.bytes(rng.range(1, 4096)));
    else if (kind === 1) c.writeRaw(rng.bytes(rng.range(1, 47)));
    else if (kind === 2) {
      const bhs = rng.bytes(48);
      bhs[4] = rng.pick([0, 1, 255]);
      bhs[5] = 0xff;
      c.writeRaw(Buffer.concat([bhs, rng.bytes(rng.range(0, 1024))]));
    } else {
      const pdu = RawIscsi.encode(c.command(randomCdb(ctx, rng), { read: true, edtl: 4096, data: rng.bytes(rng.pick([0, 100, 4096])) }));
      c.writeRaw(rng.mutate(pdu));
    }
    await c.next(answerMs, () => false);
  } finally {
    c.close();
  }
  return [];
};

// ---- peer frames and HTTP ---------------------------------------------------------------

/** 1-5 batches of request frames (well-formed, header-mutated, or garbage) to a peer's page service, as another member. */
export const peerFrameCase: FuzzCase = async (ctx, rng) => {
  const v = rng.pick([ctx.fuzz, ctx.solo]);
  const to = v === ctx.solo ? ctx.solo.owner : rng.int(ctx.rpcAddresses.length);
  const as = ctx.peerIds[(to + 1) % ctx.peerIds.length];
  const s = openBlockStream(ctx.rpcAddresses[to], ctx.secret, as);
  try {
    const batches = rng.range(1, 5);
    let sent = 0;
    for (let i = 0; i < batches; i++) {
      const frames: Buffer[] = [];
      for (let n = rng.range(1, 4); n > 0; n--) frames.push(randomRequestFrame(rng, v.id, v.blocks, alphabet));
      sent += frames.length;
      const batch = batchOf(frames);
      s.write(rng.chance(0.8) ? batch : rng.chance(0.5) ? rng.mutate(batch) : rng.bytes(rng.range(0, 200)));
    }
    // Every frame answered (or the stream refused): a reply that kills the peer has been made by then.
    await s.settle(sent, 2_000);
    // A stream that ended with frames unanswered (refused, or the peer going down) may still have
    // requests running on the peer: give them, and a crash they cause, the moment they take,
    // so that the check after this case blames this case.
    if (s.ended && s.replyFrames < sent) await new Promise((r) => setTimeout(r, 250));
  } finally {
    s.close();
  }
  return [];
};

/** 1-3 raw HTTP requests to a console/API port, with and without the token. */
export const httpCase: FuzzCase = async (ctx, rng) => {
  const n = rng.range(1, 3);
  for (let i = 0; i < n; i++) await sendHttp(rng.pick(ctx.httpPorts), randomHttpRequest(rng, ctx.token), 300, hostileAddress);
  return [];
};

/** Every kind of case with its weight (how often it is drawn). */
export const cases: ReadonlyArray<[string, FuzzCase, number]> = [
  ['login', loginCase, 3],
  ['discovery', discoveryCase, 1],
  ['command', commandCase, 3],
  ['data-out', dataOutCase, 4],
  ['flags', flagMismatchCase, 1],
  ['negotiation', negotiationCase, 1],
  ['misc', miscCase, 2],
  ['garbage', garbageCase, 2],
  ['peer-frame', peerFrameCase, 3],
  ['http', httpCase, 2],
];

export function pickCase(rng: Rng): [string, FuzzCase] {
  const total = cases.reduce((a, [, , w]) => a + w, 0);
  let x = rng.int(total);
  for (const [name, fn, w] of cases) {
    if (x < w) return [name, fn];
    x -= w;
  }
  throw new Error('unreachable: weights cover the range');
}

