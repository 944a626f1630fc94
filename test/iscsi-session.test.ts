// The full-feature-phase session as a pure state machine: typed PDUs in, typed PDUs out, a
// fake logical unit whose completions the test controls.

import t from 'tap';
import { snLess } from '../src/iscsi/session';
import { Op, TmfFunction, TmfResponse, type DataInPdu, type R2tPdu, type ScsiResponsePdu } from '../src/iscsi/types';
import { ScsiStatus } from '../src/scsi/types';
import { cmd, lun0, setup, tick, write10 } from './helpers/session-fixture';

t.test('serial number arithmetic wraps', async (t) => {
  t.ok(snLess(0xfffffff0, 5));
  t.notOk(snLess(5, 0xfffffff0));
  t.notOk(snLess(7, 7));
});

t.test('commands reach the LU in CmdSN order; a gap holds later ones; outside the window is dropped', async (t) => {
  const { s, lu } = setup();
  lu.auto = () => ({ status: ScsiStatus.good });
  s.onPdu(cmd(3, 3), 0);
  s.onPdu(cmd(2, 2), 0);
  t.equal(lu.seen.length, 0, 'waiting for CmdSN 1');
  s.onPdu(cmd(9, 100000), 0);
  s.onPdu(cmd(1, 1), 0);
  t.same(lu.seen.map((c) => c.cdb.length), [16, 16, 16], 'three delivered');
  await tick();
  s.onPdu(cmd(4, 4, { immediate: true }), 0);
  t.equal(lu.seen.length, 4, 'immediate commands bypass ordering');
});

t.test('write without immediate data: R2Ts by MaxBurstLength, data gathered, then one LU call', async (t) => {
  const { s, lu, out } = setup({ immediateData: false, initialR2T: true, maxBurstLength: 4096, maxOutstandingR2T: 2 });
  lu.auto = (c) => ({ status: ScsiStatus.good, dataOutBytesUsed: c.expectedDataLength });
  s.onPdu(cmd(1, 1, { write: true, cdb: write10, edtl: 10000 }), 0);
  const r2ts = out.filter((p): p is R2tPdu => p.opcode === Op.r2t);
  t.same(r2ts.map((r) => [r.bufferOffset, r.desiredDataTransferLength, r.r2tSN]), [[0, 4096, 0], [4096, 4096, 1]], 'two outstanding');
  const send = (r: R2tPdu, fill: number): void => {
    for (let off = 0, sn = 0; off < r.desiredDataTransferLength; off += 2048, sn++) {
      const len = Math.min(2048, r.desiredDataTransferLength - off);
      s.onPdu({ opcode: Op.dataOut, immediate: false, final: off + len === r.desiredDataTransferLength, initiatorTaskTag: 1, data: Buffer.alloc(len, fill), lun: lun0, targetTransferTag: r.targetTransferTag, expStatSN: 0, dataSN: sn, bufferOffset: r.bufferOffset + off }, 0);
    }
  };
  send(r2ts[0], 1);
  const third = out.filter((p): p is R2tPdu => p.opcode === Op.r2t)[2];
  t.same([third.bufferOffset, third.desiredDataTransferLength], [8192, 1808], 'third R2T once one completed');
  send(r2ts[1], 2);
  t.equal(lu.seen.length, 0, 'not yet: data missing');
  send(third, 3);
  t.equal(lu.seen.length, 1);
  const data = lu.seen[0].dataOut!;
  t.equal(data.length, 10000);
  t.same([data[0], data[4096], data[9999]], [1, 2, 3]);
  await tick();
  const rsp = out.find((p): p is ScsiResponsePdu => p.opcode === Op.scsiResponse)!;
  t.equal(rsp.status, ScsiStatus.good);
});

t.test('immediate data: all of it goes to the LU as is; part of it is gathered with the Data-Out that follows', async (t) => {
  const { s, lu, out } = setup({ immediateData: true, initialR2T: false, firstBurstLength: 65536 });
  lu.auto = (c) => ({ status: ScsiStatus.good, dataOutBytesUsed: c.expectedDataLength });
  const whole = Buffer.alloc(4096, 7);
  s.onPdu(cmd(1, 1, { write: true, cdb: write10, edtl: 4096, data: whole }), 0);
  t.equal(lu.seen.length, 1, 'no R2T, no wait: the data is all there');
  t.same(lu.seen[0].dataOut, whole);
  const part = Buffer.alloc(1024, 8);
  // F clear on the command: unsolicited Data-Out PDUs follow (InitialR2T=No).
  s.onPdu(cmd(2, 2, { write: true, cdb: write10, edtl: 3072, data: part, final: false }), 0);
  t.equal(lu.seen.length, 1, 'waits for the unsolicited rest');
  s.onPdu({ opcode: Op.dataOut, immediate: false, final: true, initiatorTaskTag: 2, data: Buffer.alloc(2048, 9), lun: lun0, targetTransferTag: 0xffffffff, expStatSN: 0, dataSN: 0, bufferOffset: 1024 }, 0);
  t.equal(lu.seen.length, 2);
  t.same([lu.seen[1].dataOut!.length, lu.seen[1].dataOut![0], lu.seen[1].dataOut![1023], lu.seen[1].dataOut![1024], lu.seen[1].dataOut![3071]], [3072, 8, 8, 9, 9]);
  t.equal(part.length, 1024, 'the immediate data of a partial write is copied, not grown into');
  await tick();
  t.equal(out.filter((p) => p.opcode === Op.scsiResponse).length, 2);
  t.equal(out.filter((p) => p.opcode === Op.r2t).length, 0);
});

t.test('a wrong DataSN fails the command, not the session', async (t) => {
  const { s, lu, out, closed } = setup({ immediateData: false, initialR2T: true });
  s.onPdu(cmd(1, 1, { write: true, cdb: write10, edtl: 512 }), 0);
  const r2t = out.find((p): p is R2tPdu => p.opcode === Op.r2t)!;
  s.onPdu({ opcode: Op.dataOut, immediate: false, final: true, initiatorTaskTag: 1, data: Buffer.alloc(512), lun: lun0, targetTransferTag: r2t.targetTransferTag, expStatSN: 0, dataSN: 27, bufferOffset: 0 }, 0);
  await tick();
  const rsp = out.find((p): p is ScsiResponsePdu => p.opcode === Op.scsiResponse)!;
  t.equal(rsp.status, ScsiStatus.checkCondition);
  t.equal(lu.seen.length, 0, 'never reached the LU');
  t.same(closed, []);
});

t.test('read data goes out in MaxXmitDataSegmentLength pieces with the status in the last one', async (t) => {
  const { s, lu, out } = setup({ maxXmitDataSegmentLength: 8192, maxBurstLength: 16384 });
  lu.auto = () => ({ status: ScsiStatus.good, dataIn: Buffer.alloc(20000, 7) });
  s.onPdu(cmd(1, 1, { read: true, edtl: 24576 }), 0);
  await tick();
  const dataIns = out.filter((p): p is DataInPdu => p.opcode === Op.dataIn);
  t.same(dataIns.map((d) => [d.bufferOffset, d.data.length, d.dataSN, d.final, d.hasStatus]), [
    [0, 8192, 0, false, false], [8192, 8192, 1, true, false], [16384, 3616, 2, true, true],
  ], 'F at the end of each burst, S on the last');
  const last = dataIns[2];
  t.equal(last.underflow, true);
  t.equal(last.residualCount, 24576 - 20000);
  t.equal(last.statSN, 100);
  t.notOk(out.some((p) => p.opcode === Op.scsiResponse), 'no separate response');
});

t.test('CHECK CONDITION goes in a SCSI Response with the sense length prefix', async (t) => {
  const { s, lu, out } = setup();
  const sense = Buffer.alloc(18);
  sense[0] = 0x70;
  sense[2] = 5;
  lu.auto = () => ({ status: ScsiStatus.checkCondition, sense });
  s.onPdu(cmd(1, 1, { read: true, edtl: 512 }), 0);
  await tick();
  const rsp = out.find((p): p is ScsiResponsePdu => p.opcode === Op.scsiResponse)!;
  t.equal(rsp.data.readUInt16BE(0), 18);
  t.equal(rsp.data[2 + 2], 5);
});

t.test('ABORT TASK waits for the LU, then no response for the task', async (t) => {
  const { s, lu, out } = setup();
  s.onPdu(cmd(1, 1, { read: true, edtl: 512 }), 0);
  s.onPdu({ opcode: Op.taskMgmtRequest, immediate: true, final: true, initiatorTaskTag: 2, data: Buffer.alloc(0), function: TmfFunction.abortTask, lun: lun0, referencedTaskTag: 1, cmdSN: 2, expStatSN: 100, refCmdSN: 1, expDataSN: 0 }, 0);
  await tick();
  t.notOk(out.some((p) => p.opcode === Op.taskMgmtResponse), 'not answered while the LU still runs it');
  lu.pending[0]({ status: ScsiStatus.good, dataIn: Buffer.alloc(512) });
  await tick();
  const tmf = out.find((p) => p.opcode === Op.taskMgmtResponse);
  t.equal(tmf && 'response' in tmf && tmf.response, TmfResponse.complete);
  t.notOk(out.some((p) => p.opcode === Op.dataIn || p.opcode === Op.scsiResponse), 'aborted task sends nothing');
});

t.test('ABORT TASK of a command already answered: TASK DOES NOT EXIST (libiscsi AbortTaskSimpleAsync)', async (t) => {
  const { s, lu, out } = setup();
  s.onPdu(cmd(1, 1, { read: true, edtl: 512 }), 0);
  await tick();
  lu.pending[0]({ status: ScsiStatus.good, dataIn: Buffer.alloc(512) });
  await tick();
  t.ok(out.some((p) => p.opcode === Op.scsiResponse || p.opcode === Op.dataIn), 'the command was answered');
  s.onPdu({ opcode: Op.taskMgmtRequest, immediate: true, final: true, initiatorTaskTag: 2, data: Buffer.alloc(0), function: TmfFunction.abortTask, lun: lun0, referencedTaskTag: 1, cmdSN: 2, expStatSN: 100, refCmdSN: 1, expDataSN: 0 }, 0);
  await tick();
  const tmf = out.find((p) => p.opcode === Op.taskMgmtResponse);
  t.equal(tmf && 'response' in tmf && tmf.response, TmfResponse.taskDoesNotExist, 'not "complete": the command ran and was answered');
  // A command not received yet (its CmdSN is still ahead, inside the window) counts as received and aborted.
  s.onPdu({ opcode: Op.taskMgmtRequest, immediate: true, final: true, initiatorTaskTag: 3, data: Buffer.alloc(0), function: TmfFunction.abortTask, lun: lun0, referencedTaskTag: 7, cmdSN: 3, expStatSN: 100, refCmdSN: 2, expDataSN: 0 }, 0);
  await tick();
  const tmf2 = out.filter((p) => p.opcode === Op.taskMgmtResponse)[1];
  t.equal(tmf2 && 'response' in tmf2 && tmf2.response, TmfResponse.complete);
});

t.test('NOP: answers pings, pings when idle, gives up on a silent initiator', async (t) => {
  const { s, out, closed } = setup();
  s.onPdu({ opcode: Op.nopOut, immediate: true, final: true, initiatorTaskTag: 5, data: Buffer.from('hi'), lun: lun0, targetTransferTag: 0xffffffff, cmdSN: 1, expStatSN: 100 }, 0);
  const echo = out.find((p) => p.opcode === Op.nopIn)!;
  t.same(echo.data, Buffer.from('hi'));
  s.tick(6_000);
  const ping = out.filter((p) => p.opcode === Op.nopIn)[1];
  t.ok(ping && ping.initiatorTaskTag === 0xffffffff, 'target ping after idle time');
  s.tick(30_000);
  t.same(closed, ['no answer to NOP-In ping']);
});

t.test('logout answers only once the nexus has ended in every LU (its RESERVE(6) reservation dropped), and tells the LU once', async (t) => {
  const { s, lu, out, closed } = setup();
  let release!: () => void;
  let ended = 0;
  lu.nexusLost = () => {
    ended++;
    return new Promise<void>((r) => (release = r));
  };
  s.onPdu({ opcode: Op.logoutRequest, immediate: true, final: true, initiatorTaskTag: 9, data: Buffer.alloc(0), reasonCode: 0, cid: 0, cmdSN: 1, expStatSN: 100 }, 0);
  await tick();
  await tick();
  t.equal(ended, 1, 'the LU hears the nexus end at the logout');
  t.notOk(out.some((p) => p.opcode === Op.logoutResponse), 'no Logout Response while the reservation is being dropped');
  release();
  await tick();
  await tick();
  t.ok(out.some((p) => p.opcode === Op.logoutResponse), 'the Logout Response once it is dropped');
  t.same(closed, ['logout']);
  s.destroy();
  t.equal(ended, 1, 'the connection closing does not tell the LU a second time');
});

t.test('logout waits for commands in flight, then answers and closes', async (t) => {
  const { s, lu, out, closed } = setup();
  s.onPdu(cmd(1, 1, { read: true, edtl: 512 }), 0);
  s.onPdu({ opcode: Op.logoutRequest, immediate: true, final: true, initiatorTaskTag: 9, data: Buffer.alloc(0), reasonCode: 0, cid: 0, cmdSN: 2, expStatSN: 100 }, 0);
  await tick();
  t.notOk(out.some((p) => p.opcode === Op.logoutResponse));
  lu.pending[0]({ status: ScsiStatus.good, dataIn: Buffer.alloc(512) });
  await tick();
  await tick();
  const kinds = out.map((p) => p.opcode);
  t.ok(kinds.indexOf(Op.dataIn) < kinds.indexOf(Op.logoutResponse), 'data first, then the logout response');
  t.same(closed, ['logout']);
});
