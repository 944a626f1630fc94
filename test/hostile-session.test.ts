// Issue 15, the session's part: a hostile or broken initiator must not make the target write
// bytes it never received (finding 1), keep anything for a command it drops (3), or get away
// with data the negotiated values forbid (8). Driven with typed PDUs, no sockets.

import t from 'tap';
import { ByteBudget } from '../src/iscsi/budget';
import { answerStallMsMax, peerTaskBytesMax, sessionAnswerBytesMax, sessionParkedBytesMax, sessionTaskBytesMax } from '../src/limits';
import { Op, RejectReason, TmfFunction, type InitiatorPdu, type R2tPdu, type RejectPdu, type ScsiResponsePdu, type TargetPdu } from '../src/iscsi/types';
import { ScsiStatus } from '../src/scsi/types';
import { cmd, dataOut, lun0, setup, tick, write10, type Fixture } from './helpers/session-fixture';

const KiB = 1024;

function responses(out: TargetPdu[]): ScsiResponsePdu[] {
  return out.filter((p): p is ScsiResponsePdu => p.opcode === Op.scsiResponse);
}
function r2ts(out: TargetPdu[]): R2tPdu[] {
  return out.filter((p): p is R2tPdu => p.opcode === Op.r2t);
}
/** Sense key / ASC / ASCQ of a SCSI Response's sense data (after the 2-byte length). */
function senseOf(rsp: ScsiResponsePdu): [number, number, number] {
  return [rsp.data[2 + 2] & 0x0f, rsp.data[2 + 12], rsp.data[2 + 13]];
}

/** The LU must never see a command; the one response is CHECK CONDITION with this sense. */
async function failedWith(t: Tap.Test, f: Fixture, sense: [number, number, number], what: string): Promise<void> {
  await tick();
  t.equal(f.lu.seen.length, 0, `${what}: the LU is never called`);
  const rsps = responses(f.out);
  t.equal(rsps.length, 1, `${what}: answered once`);
  if (rsps.length !== 1) return;
  t.equal(rsps[0].status, ScsiStatus.checkCondition, `${what}: CHECK CONDITION`);
  t.same(senseOf(rsps[0]), sense, `${what}: sense`);
}

const dataOffsetError: [number, number, number] = [0x0b, 0x4b, 0x05];
const incorrectAmount: [number, number, number] = [0x0b, 0x0c, 0x0d];
const unexpectedUnsolicited: [number, number, number] = [0x0b, 0x0c, 0x0c];

/** A 1 MiB WRITE answered by one R2T of 1 MiB (MaxBurstLength 1 MiB, InitialR2T=Yes). */
function writeOneR2t(): Fixture & { ttt: number } {
  const f = setup({ immediateData: false, initialR2T: true, maxBurstLength: 1024 * KiB, firstBurstLength: 256 * KiB, maxRecvDataSegmentLength: 256 * KiB });
  f.lu.auto = (c) => ({ status: ScsiStatus.good, dataOutBytesUsed: c.expectedDataLength });
  f.s.onPdu(cmd(1, 1, { write: true, edtl: 1024 * KiB, cdb: write10 }), 0);
  const r = r2ts(f.out);
  if (r.length !== 1 || r[0].desiredDataTransferLength !== 1024 * KiB) throw new Error('expected one R2T of 1 MiB');
  return { ...f, ttt: r[0].targetTransferTag };
}

t.test('finding 1, the attack: Data-Outs at 0, 256K, 0, 256K inside one R2T never reach the LU', async (t) => {
  const f = writeOneR2t();
  const offsets = [0, 256 * KiB, 0, 256 * KiB];
  offsets.forEach((offset, dataSN) => f.s.onPdu(dataOut(1, { ttt: f.ttt, dataSN, offset, data: Buffer.alloc(256 * KiB, 0xaa), final: dataSN === 3 }), 0));
  await failedWith(t, f, dataOffsetError, 'overlap');
  t.equal(f.s.commandsInFlight, 0, 'the task is gone');
});

t.test('finding 1: every other way a Data-Out sequence can be wrong fails the command, the LU never called', async (t) => {
  await t.test('gap', async (t) => {
    const f = writeOneR2t();
    f.s.onPdu(dataOut(1, { ttt: f.ttt, dataSN: 0, offset: 0, data: Buffer.alloc(256 * KiB) }), 0);
    f.s.onPdu(dataOut(1, { ttt: f.ttt, dataSN: 1, offset: 512 * KiB, data: Buffer.alloc(512 * KiB), final: true }), 0);
    await failedWith(t, f, dataOffsetError, 'gap');
  });
  await t.test('beyond the R2T (and beyond EDTL)', async (t) => {
    const f = writeOneR2t();
    f.s.onPdu(dataOut(1, { ttt: f.ttt, dataSN: 0, offset: 0, data: Buffer.alloc(768 * KiB) }), 0);
    f.s.onPdu(dataOut(1, { ttt: f.ttt, dataSN: 1, offset: 768 * KiB, data: Buffer.alloc(512 * KiB), final: true }), 0);
    await failedWith(t, f, incorrectAmount, 'beyond');
  });
  await t.test('beyond the R2T but inside EDTL', async (t) => {
    const f = setup({ immediateData: false, initialR2T: true, maxBurstLength: 4 * KiB, maxOutstandingR2T: 1 });
    f.s.onPdu(cmd(1, 1, { write: true, edtl: 8 * KiB, cdb: write10 }), 0);
    const [r] = r2ts(f.out);
    t.same([r.bufferOffset, r.desiredDataTransferLength], [0, 4 * KiB]);
    f.s.onPdu(dataOut(1, { ttt: r.targetTransferTag, dataSN: 0, offset: 0, data: Buffer.alloc(8 * KiB), final: true }), 0);
    await failedWith(t, f, incorrectAmount, 'beyond R2T');
    t.equal(r2ts(f.out).length, 1, 'no more R2Ts for a failed command');
  });
  await t.test('unknown TTT: the PDU is rejected, the command fails', async (t) => {
    const f = writeOneR2t();
    f.s.onPdu(dataOut(1, { ttt: f.ttt + 100, dataSN: 0, offset: 0, data: Buffer.alloc(1024 * KiB), final: true }), 0);
    t.ok(f.out.some((p) => p.opcode === Op.reject && (p as RejectPdu).reason === RejectReason.protocolError), 'Reject (protocol error)');
    // The R2T the initiator still owes us: once it ends, the command is answered.
    f.s.onPdu(dataOut(1, { ttt: f.ttt, dataSN: 0, offset: 0, data: Buffer.alloc(1024 * KiB), final: true }), 0);
    await failedWith(t, f, [0x0b, 0x4b, 0x01], 'unknown TTT');
  });
  await t.test('F bit early / too few bytes', async (t) => {
    const f = writeOneR2t();
    f.s.onPdu(dataOut(1, { ttt: f.ttt, dataSN: 0, offset: 0, data: Buffer.alloc(512 * KiB), final: true }), 0);
    await failedWith(t, f, incorrectAmount, 'F early');
  });
  await t.test('unsolicited data beyond FirstBurstLength', async (t) => {
    const f = setup({ immediateData: true, initialR2T: false, firstBurstLength: 8 * KiB, maxBurstLength: 64 * KiB });
    f.s.onPdu(cmd(1, 1, { write: true, edtl: 32 * KiB, cdb: write10, data: Buffer.alloc(4 * KiB), final: false }), 0);
    f.s.onPdu(dataOut(1, { dataSN: 0, offset: 4 * KiB, data: Buffer.alloc(8 * KiB), final: true }), 0);
    const [r] = r2ts(f.out);
    t.same([r.bufferOffset, r.desiredDataTransferLength], [8 * KiB, 24 * KiB], 'the R2T sent before the failure');
    await tick();
    t.equal(responses(f.out).length, 0, 'not answered while the R2T is owed');
    f.s.onPdu(dataOut(1, { ttt: r.targetTransferTag, dataSN: 0, offset: 8 * KiB, data: Buffer.alloc(24 * KiB), final: true }), 0);
    await failedWith(t, f, incorrectAmount, 'unsolicited beyond FirstBurstLength');
  });
  await t.test('unsolicited Data-Out when InitialR2T=Yes', async (t) => {
    const f = setup({ immediateData: true, initialR2T: true, maxBurstLength: 64 * KiB });
    f.s.onPdu(cmd(1, 1, { write: true, edtl: 8 * KiB, cdb: write10, data: Buffer.alloc(4 * KiB), final: true }), 0);
    const [r] = r2ts(f.out);
    t.same([r.bufferOffset, r.desiredDataTransferLength], [4 * KiB, 4 * KiB], 'the rest is solicited');
    f.s.onPdu(dataOut(1, { dataSN: 0, offset: 4 * KiB, data: Buffer.alloc(4 * KiB), final: true }), 0);
    f.s.onPdu(dataOut(1, { ttt: r.targetTransferTag, dataSN: 0, offset: 4 * KiB, data: Buffer.alloc(4 * KiB), final: true }), 0);
    await failedWith(t, f, unexpectedUnsolicited, 'unsolicited with InitialR2T=Yes');
  });
  await t.test('a late Data-Out for a failed command is not taken for a new command with the same ITT', async (t) => {
    const f = setup({ immediateData: true, initialR2T: false, firstBurstLength: 64 * KiB, maxBurstLength: 64 * KiB });
    f.lu.auto = (c) => ({ status: ScsiStatus.good, dataOutBytesUsed: c.expectedDataLength });
    f.s.onPdu(cmd(1, 1, { write: true, edtl: 16 * KiB, cdb: write10, data: Buffer.alloc(4 * KiB, 1), final: false }), 0);
    f.s.onPdu(dataOut(1, { dataSN: 5, offset: 4 * KiB, data: Buffer.alloc(4 * KiB, 2) }), 0);
    await tick();
    t.equal(responses(f.out).length, 0, 'not answered while the initiator may still send data for it');
    f.s.onPdu(dataOut(1, { dataSN: 6, offset: 8 * KiB, data: Buffer.alloc(8 * KiB, 3), final: true }), 0);
    await failedWith(t, f, [0x0b, 0x4b, 0x00], 'DataSN');
  });
});

t.test('finding 1: a correct write still reaches the LU whole (immediate + unsolicited + two R2Ts)', async (t) => {
  const f = setup({ immediateData: true, initialR2T: false, firstBurstLength: 8 * KiB, maxBurstLength: 8 * KiB, maxOutstandingR2T: 2 });
  f.lu.auto = (c) => ({ status: ScsiStatus.good, dataOutBytesUsed: c.expectedDataLength });
  f.s.onPdu(cmd(1, 1, { write: true, edtl: 24 * KiB, cdb: write10, data: Buffer.alloc(4 * KiB, 1), final: false }), 0);
  f.s.onPdu(dataOut(1, { dataSN: 0, offset: 4 * KiB, data: Buffer.alloc(4 * KiB, 2), final: true }), 0);
  const rs = r2ts(f.out);
  t.same(rs.map((r) => [r.bufferOffset, r.desiredDataTransferLength]), [[8 * KiB, 8 * KiB], [16 * KiB, 8 * KiB]]);
  f.s.onPdu(dataOut(1, { ttt: rs[1].targetTransferTag, dataSN: 0, offset: 16 * KiB, data: Buffer.alloc(8 * KiB, 4), final: true }), 0);
  f.s.onPdu(dataOut(1, { ttt: rs[0].targetTransferTag, dataSN: 0, offset: 8 * KiB, data: Buffer.alloc(8 * KiB, 3), final: true }), 0);
  await tick();
  t.equal(f.lu.seen.length, 1);
  const d = f.lu.seen[0].dataOut!;
  t.same([d.length, d[0], d[4 * KiB], d[8 * KiB], d[16 * KiB], d[24 * KiB - 1]], [24 * KiB, 1, 2, 3, 4, 4]);
  t.equal(responses(f.out)[0].status, ScsiStatus.good);
});

t.test('finding 3: commands outside the CmdSN window keep nothing', async (t) => {
  const f = setup();
  f.lu.auto = () => ({ status: ScsiStatus.good, dataIn: Buffer.alloc(512) });
  global.gc?.();
  const heapBefore = process.memoryUsage().heapUsed;
  // ExpCmdSN is 1 and the window 128 wide: CmdSN 1000 and up are all outside it.
  for (let i = 0; i < 400_000; i++) f.s.onPdu(cmd(i + 10, 1000 + i, { read: true, edtl: 512 }), 0);
  t.equal(f.s.commandsInFlight, 0, 'no task kept for a dropped command');
  global.gc?.();
  const grownMB = (process.memoryUsage().heapUsed - heapBefore) / 1e6;
  t.ok(grownMB < 64, `heap grew ${grownMB.toFixed(1)} MB (< 64)`);
  t.equal(f.out.length, 0, 'dropped silently');
  // The session still works: the next in-window command runs.
  f.s.onPdu(cmd(1, 1, { read: true, edtl: 512 }), 0);
  await tick();
  t.equal(f.lu.seen.length, 1);
});

t.test('finding 2 (window): immediate commands count against the CmdSN window; the excess is rejected with reason 0x06', async (t) => {
  const f = setup();
  // 128 commands held (the LU does not answer), the last ones immediate.
  for (let i = 0; i < 100; i++) f.s.onPdu(cmd(i + 1, i + 1, { read: true, edtl: 512 }), 0);
  for (let i = 100; i < 128; i++) f.s.onPdu(cmd(i + 1, 101, { read: true, edtl: 512, immediate: true }), 0);
  t.equal(f.s.commandsInFlight, 128);
  t.equal(f.out.filter((p) => p.opcode === Op.reject).length, 0, 'within the window: all taken');
  for (let i = 0; i < 1000; i++) f.s.onPdu(cmd(i + 1000, 101, { read: true, edtl: 512, immediate: true }), 0);
  t.equal(f.s.commandsInFlight, 128, 'no more held');
  const rejects = f.out.filter((p): p is RejectPdu => p.opcode === Op.reject);
  t.equal(rejects.length, 1000);
  t.ok(rejects.every((r) => r.reason === RejectReason.immediateCommandReject), 'reason 0x06');
});

t.test('finding 8: the session enforces what was negotiated and the direction flags', async (t) => {
  await t.test('immediate data when ImmediateData=No', async (t) => {
    const f = setup({ immediateData: false, initialR2T: true });
    f.s.onPdu(cmd(1, 1, { write: true, edtl: 4 * KiB, cdb: write10, data: Buffer.alloc(4 * KiB) }), 0);
    t.equal(r2ts(f.out).length, 0, 'no R2T for a failed command');
    await failedWith(t, f, unexpectedUnsolicited, 'ImmediateData=No');
  });
  await t.test('more immediate data than FirstBurstLength', async (t) => {
    const f = setup({ immediateData: true, initialR2T: false, firstBurstLength: 4 * KiB });
    f.s.onPdu(cmd(1, 1, { write: true, edtl: 16 * KiB, cdb: write10, data: Buffer.alloc(8 * KiB) }), 0);
    await failedWith(t, f, incorrectAmount, 'immediate > FirstBurstLength');
  });
  await t.test('more immediate data than EDTL', async (t) => {
    const f = setup({ immediateData: true, initialR2T: false, firstBurstLength: 64 * KiB });
    f.s.onPdu(cmd(1, 1, { write: true, edtl: 4 * KiB, cdb: write10, data: Buffer.alloc(8 * KiB) }), 0);
    await failedWith(t, f, incorrectAmount, 'immediate > EDTL');
  });
  await t.test('a WRITE with only the R flag', async (t) => {
    const f = setup();
    f.lu.auto = () => ({ status: ScsiStatus.good, dataOutBytesUsed: 4 * KiB });
    f.s.onPdu(cmd(1, 1, { read: true, edtl: 4 * KiB, cdb: write10 }), 0);
    await failedWith(t, f, [0x05, 0x24, 0x00], 'WRITE with R');
  });
  await t.test('a READ with only the W flag: GOOD, nothing sent back (what libiscsi iSCSIResiduals.Read10Invalid requires)', async (t) => {
    const f = setup({ immediateData: false, initialR2T: true });
    f.lu.auto = () => ({ status: ScsiStatus.good, dataIn: Buffer.alloc(4 * KiB, 9) });
    f.s.onPdu(cmd(1, 1, { write: true, edtl: 4 * KiB }), 0);
    const [r] = r2ts(f.out);
    f.s.onPdu(dataOut(1, { ttt: r.targetTransferTag, dataSN: 0, offset: 0, data: Buffer.alloc(4 * KiB), final: true }), 0);
    await tick();
    t.equal(responses(f.out)[0]?.status, ScsiStatus.good);
    t.notOk(f.out.some((p) => p.opcode === Op.dataIn), 'no Data-In for a command without R');
  });
  await t.test('data expected with neither flag', async (t) => {
    const f = setup();
    f.lu.auto = () => ({ status: ScsiStatus.good, dataIn: Buffer.alloc(4 * KiB) });
    f.s.onPdu(cmd(1, 1, { edtl: 4 * KiB }), 0);
    await failedWith(t, f, [0x05, 0x24, 0x00], 'no R, no W');
  });
});

// ---- finding 2: what a session, and all sessions together, may hold ------------------------

const MiB = 1024 * 1024;
/** One 8 MiB answer shared by every read: the test measures what the session admits, not its own allocations. */
const bigAnswer = Buffer.alloc(8 * MiB, 0x5a);

function hog(budget: ByteBudget): Fixture {
  const f = setup({ maxXmitDataSegmentLength: 256 * KiB, maxBurstLength: 16 * MiB - 1 }, { budget, holdFlushes: true });
  f.lu.auto = (c) => ({ status: ScsiStatus.good, dataIn: bigAnswer.subarray(0, c.expectedDataLength) });
  // 128 READs of 8 MiB (the whole window), none of whose answers is ever read.
  for (let i = 0; i < 128; i++) f.s.onPdu(cmd(i + 1, i + 1, { read: true, edtl: 8 * MiB }), 0);
  return f;
}

t.test('finding 2: a host that queues 128 READs of 8 MiB and never reads holds at most its session bound', async (t) => {
  const budget = new ByteBudget(peerTaskBytesMax);
  const f = hog(budget);
  for (let i = 0; i < 5; i++) await tick();
  t.ok(f.s.bytesHeld <= sessionTaskBytesMax, `session holds ${f.s.bytesHeld / MiB} MiB (≤ ${sessionTaskBytesMax / MiB})`);
  t.equal(f.lu.seen.length, sessionTaskBytesMax / (8 * MiB), 'only what fits ran; the rest wait, holding nothing');
  t.equal(f.s.commandsInFlight, 128 - f.lu.seen.length, 'the others are queued, not dropped');
  // The host starts reading: every command runs in turn and is answered.
  for (let round = 0; round < 200 && f.flushes.length > 0; round++) {
    for (const flushed of f.flushes.splice(0)) flushed();
    await tick();
  }
  t.equal(f.lu.seen.length, 128, 'all ran once their turn came');
  t.equal(f.s.commandsInFlight, 0);
  t.equal(budget.usedBytes, 0, 'every byte given back');
});

t.test('finding 2: many hogs together hold at most the peer budget; a well-behaved host is still served', async (t) => {
  const budget = new ByteBudget(peerTaskBytesMax);
  const hogs: Fixture[] = [];
  for (let i = 0; i < 12; i++) hogs.push(hog(budget));
  for (let i = 0; i < 5; i++) await tick();
  const ran = hogs.reduce((n, h) => n + h.lu.seen.length, 0);
  t.ok(budget.usedBytes <= peerTaskBytesMax, `peer budget ${budget.usedBytes / MiB} MiB used (≤ ${peerTaskBytesMax / MiB})`);
  t.equal(ran * 8 * MiB, budget.usedBytes, 'what ran is what is held (8 MiB reads are beyond the guaranteed bytes)');
  t.ok(hogs.every((h) => h.s.bytesHeld <= sessionTaskBytesMax), 'each within its session bound');
  const holding = hogs.filter((h) => h.s.bytesHeld > 0);
  t.equal(holding.length, peerTaskBytesMax / sessionTaskBytesMax, 'the budget went to the first hogs; the others wait holding nothing');

  // Small commands run on the session's guaranteed bytes, whatever the hogs hold.
  const good = setup({}, { budget });
  good.lu.auto = (c) => ({ status: ScsiStatus.good, dataIn: Buffer.alloc(c.expectedDataLength, 1) });
  for (let i = 0; i < 16; i++) good.s.onPdu(cmd(i + 1, i + 1, { read: true, edtl: 64 * KiB }), 0);
  for (let i = 0; i < 3; i++) await tick();
  t.equal(good.lu.seen.length, 16, 'a host with small commands is served at once');
  // A command beyond the guaranteed bytes waits for the shared budget, which the hogs hold
  // until their answers have stalled answerStallMsMax: then each is closed (the connection
  // destroys its session) and the bytes come back.
  good.s.onPdu(cmd(100, 17, { read: true, edtl: 8 * MiB }), 0);
  await tick();
  t.equal(good.lu.seen.length, 16, 'an 8 MiB read waits while the hogs hold the budget');
  // Each round the hogs then holding bytes are closed and those next in line take them.
  let rounds = 0;
  for (let nowMs = 1; rounds < hogs.length && good.lu.seen.length === 16; rounds++, nowMs += answerStallMsMax + 2) {
    for (const h of hogs) h.s.tick(nowMs);
    for (const h of hogs) {
      h.s.tick(nowMs + answerStallMsMax + 1);
      if (h.closed.includes('answers not read')) h.s.destroy();
    }
    await tick();
    t.ok(budget.usedBytes <= peerTaskBytesMax, `round ${rounds}: budget within its bound`);
  }
  t.ok(holding.every((h) => h.closed.includes('answers not read')), 'every hog that held bytes was closed');
  t.equal(good.lu.seen.length, 17, `then it ran (in line after the hogs that waited before it; ${rounds} rounds)`);
});

t.test('finding 2: writes take their bytes before their data is solicited; waiting ones hold only what they parked', async (t) => {
  const budget = new ByteBudget(peerTaskBytesMax);
  const f = setup({ immediateData: true, initialR2T: false, firstBurstLength: 64 * KiB, maxBurstLength: 1 * MiB, maxOutstandingR2T: 1 }, { budget });
  f.lu.auto = (c) => ({ status: ScsiStatus.good, dataOutBytesUsed: c.expectedDataLength });
  // 8 writes of 8 MiB, each with 64 KiB of immediate data, none of whose R2Ts is answered.
  for (let i = 0; i < 8; i++) f.s.onPdu(cmd(i + 1, i + 1, { write: true, edtl: 8 * MiB, cdb: write10, data: Buffer.alloc(64 * KiB, i) }), 0);
  t.equal(r2ts(f.out).length, sessionTaskBytesMax / (8 * MiB), 'R2Ts only for the writes whose buffers fit');
  t.ok(f.s.bytesHeld <= sessionTaskBytesMax + sessionParkedBytesMax, `holds ${f.s.bytesHeld / MiB} MiB`);
  // More immediate data than a session may park: BUSY for those, once their data is in.
  for (let i = 8; i < 40; i++) f.s.onPdu(cmd(i + 1, i + 1, { write: true, edtl: 8 * MiB, cdb: write10, data: Buffer.alloc(64 * KiB, i) }), 0);
  t.ok(f.s.bytesHeld <= sessionTaskBytesMax + sessionParkedBytesMax, `still holds ${f.s.bytesHeld / MiB} MiB`);
  await tick();
  t.ok(responses(f.out).some((r) => r.status === ScsiStatus.busy), 'the excess is answered BUSY');
});

t.test('finding 2: a host that sends NOP-Outs and never reads the echoes is closed past sessionAnswerBytesMax', async (t) => {
  const nop = (itt: number): InitiatorPdu => ({ opcode: Op.nopOut, immediate: true, final: true, initiatorTaskTag: itt, data: Buffer.alloc(64 * KiB), lun: lun0, targetTransferTag: 0xffffffff, cmdSN: 1, expStatSN: 100 });
  const reader = setup({ maxXmitDataSegmentLength: 64 * KiB });
  for (let i = 0; i < 200; i++) reader.s.onPdu(nop(i), 0);
  t.same(reader.closed, [], 'a host that reads its echoes is never closed');
  const f = setup({ maxXmitDataSegmentLength: 64 * KiB }, { holdFlushes: true });
  const fits = Math.floor(sessionAnswerBytesMax / (48 + 64 * KiB));
  for (let i = 0; i < fits; i++) f.s.onPdu(nop(i), 0);
  t.same(f.closed, [], `${fits} echoes waiting: within the bound`);
  for (let i = 0; i < 1000 && f.closed.length === 0; i++) f.s.onPdu(nop(fits + i), 0);
  t.same(f.closed.slice(0, 1), ['answers not read'], 'closed once past it');
});

t.test('ByteBudget: waiters are served in the order they came; a big one is not passed by small ones', async (t) => {
  const b = new ByteBudget(10);
  const woken: string[] = [];
  const wants: Record<string, number> = { big: 8, small: 1 };
  const waiter = (name: string) => ({ wake: () => (b.tryTake(wants[name], w[name]) ? woken.push(name) : undefined) });
  const w: Record<string, { wake(): void }> = { big: waiter('big'), small: waiter('small') };
  const hog = { wake: () => undefined };
  t.ok(b.tryTake(6, hog));
  t.notOk(b.tryTake(8, w.big), 'big waits');
  t.notOk(b.tryTake(1, w.small), 'small waits behind big although 1 byte would fit');
  b.release(6);
  t.same(woken, ['big', 'small'], 'woken in order');
  t.equal(b.usedBytes, 9);
  t.throws(() => b.release(10), 'releasing more than taken is a broken invariant');
});

t.test('a command waiting behind an aborted one is admitted at once when its bytes fit', async (t) => {
  const f = setup({ maxXmitDataSegmentLength: 256 * KiB, maxBurstLength: 16 * MiB - 1 }, { budget: new ByteBudget(peerTaskBytesMax), holdFlushes: true });
  f.lu.auto = (c) => ({ status: ScsiStatus.good, dataIn: bigAnswer.subarray(0, c.expectedDataLength) });
  // Fill the session's bound but 4 MiB, answers never read: those bytes stay held.
  const fill = sessionTaskBytesMax / (8 * MiB) - 1;
  let sn = 1;
  for (; sn <= fill; sn++) f.s.onPdu(cmd(sn, sn, { read: true, edtl: 8 * MiB }), 0);
  f.s.onPdu(cmd(sn, sn, { read: true, edtl: 4 * MiB }), 0);
  const head = ++sn;
  f.s.onPdu(cmd(head, head, { read: true, edtl: 8 * MiB }), 0); // waits: 4 MiB left
  const small = ++sn;
  f.s.onPdu(cmd(small, small, { read: true, edtl: 64 * KiB }), 0); // waits behind it, in order
  await tick();
  t.equal(f.lu.seen.length, fill + 1, 'the 8 MiB read and the small one behind it wait');
  f.s.onPdu({ opcode: Op.taskMgmtRequest, immediate: true, final: true, initiatorTaskTag: 1000, data: Buffer.alloc(0), function: TmfFunction.abortTask, lun: lun0, referencedTaskTag: head, cmdSN: small + 1, expStatSN: 100, refCmdSN: head, expDataSN: 0 }, 0);
  for (let i = 0; i < 3; i++) await tick();
  t.equal(f.lu.seen.length, fill + 2, 'the small read ran once the one ahead of it was aborted');
  t.equal(f.lu.seen.at(-1)?.expectedDataLength, 64 * KiB);
});
