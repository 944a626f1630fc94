import t from 'tap';
import fc from 'fast-check';
import { BlockLogicalUnit } from '../src/scsi/device';
import { ScsiStatus, type Nexus, type ScsiResult } from '../src/scsi/types';
import { MemoryBackend } from './helpers/memory-backend';

const nexusA: Nexus = { initiatorPort: 'iqn.a,i,0x1', initiatorName: 'iqn.a', targetPort: 'iqn.t,t,0x0001', relativeTargetPort: 1 };
const nexusB: Nexus = { initiatorPort: 'iqn.b,i,0x2', initiatorName: 'iqn.b', targetPort: 'iqn.t,t,0x0001', relativeTargetPort: 1 };

function lu(backend = new MemoryBackend()): { lu: BlockLogicalUnit; backend: MemoryBackend } {
  const unit = new BlockLogicalUnit({
    lun: 0, backend, targetName: 'iqn.2026-11.io.peersan:v',
    identity: { volumeId: '0123456789abcdef', volumeName: 'v', vendor: 'PEERSAN', product: 'peersan volume', revision: '0.1', readOnly: false },
  });
  return { lu: unit, backend };
}

function run(unit: BlockLogicalUnit, cdbHex: string | Buffer, dataOut: Buffer | null = null, nexus = nexusA, edtl?: number): Promise<ScsiResult> {
  const cdb = typeof cdbHex === 'string' ? Buffer.from(cdbHex.replace(/ /g, ''), 'hex') : cdbHex;
  return unit.execute({ cdb, lun: 0, nexus, taskAttr: 1, expectedDataLength: edtl ?? dataOut?.length ?? 4096, dataOut });
}

const senseKey = (r: ScsiResult): number => (r.sense![0] & 0x7f) === 0x72 ? r.sense![1] & 0x0f : r.sense![2] & 0x0f;
const asc = (r: ScsiResult): number => ((r.sense![0] & 0x7f) === 0x72 ? r.sense!.readUInt16BE(2) : r.sense!.readUInt16BE(12));

function read10(lba: number, blocks: number): Buffer {
  const c = Buffer.alloc(10);
  c[0] = 0x28;
  c.writeUInt32BE(lba, 2);
  c.writeUInt16BE(blocks, 7);
  return c;
}
function write10(lba: number, blocks: number, fua = false): Buffer {
  const c = read10(lba, blocks);
  c[0] = 0x2a;
  if (fua) c[1] = 0x08;
  return c;
}

t.test('INQUIRY: standard data, VPD pages, allocation length', async (t) => {
  const { lu: u } = lu();
  const std = await run(u, '12 00 00 00 ff 00');
  t.equal(std.status, ScsiStatus.good);
  t.equal(std.dataIn![0], 0, 'direct access, connected');
  t.equal(std.dataIn!.subarray(8, 16).toString(), 'PEERSAN ');
  const short = await run(u, '12 00 00 00 05 00');
  t.equal(short.dataIn!.length, 5, 'cut to the allocation length');
  const pages = await run(u, '12 01 00 00 ff 00');
  t.same([...pages.dataIn!.subarray(4)], [0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2], "supported pages include Third-party Copy");
  const serial = await run(u, '12 01 80 00 ff 00');
  t.equal(serial.dataIn!.subarray(4).toString(), '0123456789abcdef', 'serial = volume id');
  const ids = await run(u, '12 01 83 00 ff 00');
  t.equal(ids.dataIn![4 + 1] & 0x0f, 3, 'first designator is NAA');
  t.equal(ids.dataIn![4 + 4] >> 4, 6, 'NAA 6');
  const again = await run(lu().lu, '12 01 83 00 ff 00');
  t.same(again.dataIn, ids.dataIn, 'identifiers stable for the volume');
  const bad = await run(u, '12 00 83 00 ff 00');
  t.equal(asc(bad), 0x2400, 'page code without EVPD');
  const lbp = await run(u, '12 01 b2 00 ff 00');
  t.equal(lbp.dataIn![5] & 0xe4, 0xe4, 'LBPU, LBPWS, LBPWS10, LBPRZ');
});

t.test('READ CAPACITY 10/16', async (t) => {
  const { lu: u } = lu(new MemoryBackend(4096, 1000));
  const r10 = await run(u, '25 00 00 00 00 00 00 00 00 00');
  t.equal(r10.dataIn!.readUInt32BE(0), 999);
  t.equal(r10.dataIn!.readUInt32BE(4), 4096);
  const r16 = await run(u, '9e 10 00 00 00 00 00 00 00 00 00 00 00 20 00 00');
  t.equal(Number(r16.dataIn!.readBigUInt64BE(0)), 999);
  t.equal(r16.dataIn![14] & 0xc0, 0xc0, 'LBPME and LBPRZ');
});

t.test('WRITE then READ, FUA, range and overflow checks', async (t) => {
  const { lu: u, backend } = lu();
  const data = Buffer.alloc(1024, 0xab);
  const w = await run(u, write10(10, 2, true), data);
  t.equal(w.status, ScsiStatus.good);
  t.equal(w.dataOutBytesUsed, 1024);
  t.equal(backend.fuaWrites, 1, 'FUA reaches the backend');
  const r = await run(u, read10(10, 2));
  t.same(r.dataIn, data);
  const beyond = await run(u, read10(4095, 2));
  t.equal(asc(beyond), 0x2100, 'LBA out of range');
  const wrap = Buffer.from('88000000000000000000000000010000'.replace(/ /g, ''), 'hex');
  wrap.writeBigUInt64BE(0xffffffffffffffffn, 2);
  wrap.writeUInt32BE(2, 10);
  t.equal(asc(await run(u, wrap)), 0x2100, 'READ(16) that wraps around 2^64');
  const zero = await run(u, read10(0, 0));
  t.equal(zero.status, ScsiStatus.good, 'zero blocks');
  const rdprotect = read10(0, 1);
  rdprotect[1] = 0x20;
  t.equal(asc(await run(u, rdprotect)), 0x2400, 'RDPROTECT without protection information');
  const r6 = await run(u, '08 00 00 0a 02 00');
  t.same(r6.dataIn, data, 'READ(6)');
});

t.test('EDTL shorter than the CDB writes only what arrived', async (t) => {
  const { lu: u, backend } = lu();
  await run(u, write10(0, 2), Buffer.alloc(1024, 0x61));
  const r = await run(u, write10(0, 2), Buffer.alloc(512, 0x62), nexusA, 512);
  t.equal(r.status, ScsiStatus.good);
  t.equal(r.dataOutBytesUsed, 1024, 'the transport reports 512 bytes of overflow');
  t.equal(backend.data[0], 0x62);
  t.equal(backend.data[512], 0x61, 'second block untouched');
});

t.test('COMPARE AND WRITE: success, miscompare offset, length checks', async (t) => {
  const { lu: u, backend } = lu();
  await run(u, write10(5, 1), Buffer.alloc(512, 1));
  const caw = (lba: number, blocks: number, data: Buffer): Promise<ScsiResult> => {
    const c = Buffer.alloc(16);
    c[0] = 0x89;
    c.writeBigUInt64BE(BigInt(lba), 2);
    c[13] = blocks;
    return run(u, c, data);
  };
  const ok = await caw(5, 1, Buffer.concat([Buffer.alloc(512, 1), Buffer.alloc(512, 2)]));
  t.equal(ok.status, ScsiStatus.good);
  t.equal(backend.data[5 * 512], 2);
  const compare = Buffer.alloc(512, 2);
  compare[100] = 9;
  const mis = await caw(5, 1, Buffer.concat([compare, Buffer.alloc(512, 3)]));
  t.equal(senseKey(mis), 0x0e, 'MISCOMPARE');
  t.equal(mis.sense!.readUInt32BE(3), 100, 'offset of the first difference in INFORMATION');
  t.equal(backend.data[5 * 512], 2, 'nothing written on miscompare');
  t.equal(asc(await caw(5, 1, Buffer.alloc(512))), 0x2400, 'data-out of the wrong size');
});

t.test('UNMAP, WRITE SAME with UNMAP and GET LBA STATUS', async (t) => {
  const { lu: u, backend } = lu();
  await run(u, write10(0, 256), Buffer.alloc(256 * 512, 7));
  const param = Buffer.alloc(24);
  param.writeUInt16BE(22, 0);
  param.writeUInt16BE(16, 2);
  param.writeBigUInt64BE(10n, 8);
  param.writeUInt32BE(20, 16);
  const unmap = await run(u, '42 00 00 00 00 00 00 00 18 00', param);
  t.equal(unmap.status, ScsiStatus.good);
  t.equal(backend.data[10 * 512], 0, 'unmapped blocks read zero');
  const status = await run(u, '9e 12 00 00 00 00 00 00 00 00 00 00 01 00 00 00');
  t.equal(status.dataIn!.readUInt32BE(0), 4 + 16 * 4, 'four extents: mapped, deallocated, mapped, deallocated');
  t.equal(status.dataIn![8 + 16 + 12], 1, 'second extent deallocated');
  const ws = Buffer.from('93 08 00 00 00 00 00 00 00 64 00 00 00 0a 00 00'.replace(/ /g, ''), 'hex');
  t.equal((await run(u, ws, Buffer.alloc(512))).status, ScsiStatus.good, 'WRITE SAME(16) UNMAP of zeros');
  t.equal(backend.mapped[100], 0);
  const wsPattern = Buffer.from('41 00 00 00 00 c8 00 00 04 00'.replace(/ /g, ''), 'hex');
  await run(u, wsPattern, Buffer.alloc(512, 0x5a));
  t.equal(backend.data[203 * 512 + 511], 0x5a, 'WRITE SAME(10) repeats the block');
  t.equal(asc(await run(u, '41 00 00 00 00 00 00 00 00 00', Buffer.alloc(512))), 0x2400, 'zero blocks refused (WSNZ)');
});

t.test('MODE SENSE / MODE SELECT switch to descriptor sense', async (t) => {
  const { lu: u } = lu();
  const all = await run(u, '1a 00 3f 00 ff 00');
  t.equal(all.status, ScsiStatus.good);
  const caching = await run(u, '1a 08 08 00 ff 00');
  t.equal(caching.dataIn![4 + 2] & 0x04, 0x04, 'WCE=1');
  const saved = await run(u, '1a 00 ca 00 ff 00');
  t.equal(asc(saved), 0x3900, 'saved values not supported');
  const control = await run(u, '1a 08 0a 00 ff 00');
  const page = Buffer.from(control.dataIn!.subarray(4));
  page[2] |= 0x04;
  const select = Buffer.concat([Buffer.alloc(4), page]);
  const r = await run(u, Buffer.from([0x15, 0x10, 0, 0, select.length, 0]), select);
  t.equal(r.status, ScsiStatus.good);
  const err = await run(u, read10(5000, 1));
  t.equal(err.sense![0], 0x72, 'descriptor format now');
  page[3] ^= 0xff;
  const bad = await run(u, Buffer.from([0x15, 0x10, 0, 0, select.length, 0]), Buffer.concat([Buffer.alloc(4), page]));
  t.equal(asc(bad), 0x2600, 'a field that may not change');
});

t.test('persistent reservations across two nexuses', async (t) => {
  const { lu: u } = lu();
  const prout = (action: number, type: number, key: bigint, saKey: bigint, nexus: Nexus): Promise<ScsiResult> => {
    const p = Buffer.alloc(24);
    p.writeBigUInt64BE(key, 0);
    p.writeBigUInt64BE(saKey, 8);
    return run(u, Buffer.from([0x5f, action, type, 0, 0, 0, 0, 0, 24, 0]), p, nexus);
  };
  t.equal((await prout(0, 0, 0n, 0xaan, nexusA)).status, ScsiStatus.good, 'A registers');
  t.equal((await prout(0, 0, 0n, 0xbbn, nexusB)).status, ScsiStatus.good, 'B registers');
  t.equal((await prout(1, 1, 0xaan, 0n, nexusA)).status, ScsiStatus.good, 'A reserves write exclusive');
  t.equal((await run(u, write10(0, 1), Buffer.alloc(512), nexusB)).status, ScsiStatus.reservationConflict, 'B may not write');
  t.equal((await run(u, read10(0, 1), null, nexusB)).status, ScsiStatus.good, 'B may read');
  t.equal((await prout(1, 1, 0xbbn, 0n, nexusB)).status, ScsiStatus.reservationConflict, 'B cannot reserve');
  t.equal((await prout(4, 1, 0xbbn, 0xaan, nexusB)).status, ScsiStatus.good, 'B preempts A');
  const ua = await run(u, read10(0, 1), null, nexusA);
  t.equal(asc(ua), 0x2a05, 'A hears REGISTRATIONS PREEMPTED');
  const keys = await run(u, '5e 00 00 00 00 00 00 00 ff 00');
  t.equal(keys.dataIn!.readUInt32BE(4), 8, 'one key left');
  t.equal(keys.dataIn!.readBigUInt64BE(8), 0xbbn);
  t.equal((await prout(0, 0, 0x12n, 0x13n, nexusA)).status, ScsiStatus.reservationConflict, 'unregistered REGISTER with a key');
});

t.test('RESERVE(6) / RELEASE(6) and LU reset', async (t) => {
  const { lu: u } = lu();
  t.equal((await run(u, '16 00 00 00 00 00', null, nexusA)).status, ScsiStatus.good);
  t.equal((await run(u, read10(0, 1), null, nexusB)).status, ScsiStatus.reservationConflict);
  t.equal((await run(u, '17 00 00 00 00 00', null, nexusB)).status, ScsiStatus.good, 'RELEASE from a non-holder is a no-op');
  t.equal((await run(u, read10(0, 1), null, nexusB)).status, ScsiStatus.reservationConflict, 'still reserved');
  await u.reset(nexusA);
  t.equal(asc(await run(u, read10(0, 1), null, nexusB)), 0x2903, 'unit attention after reset');
  t.equal((await run(u, read10(0, 1), null, nexusB)).status, ScsiStatus.good, 'reservation gone, UA reported once');
});

t.test('REPORT SUPPORTED OPERATION CODES agrees with what runs', async (t) => {
  const { lu: u } = lu();
  const all = await run(u, 'a3 0c 00 00 00 00 00 00 ff ff 00 00');
  const n = all.dataIn!.readUInt32BE(0) / 8;
  t.ok(n > 30, `${n} commands listed`);
  for (let i = 0; i < n; i++) {
    const op = all.dataIn![4 + i * 8];
    const one = await run(u, Buffer.from([0xa3, 0x0c, all.dataIn![4 + i * 8 + 5] & 1 ? 2 : 1, op, 0, all.dataIn![4 + i * 8 + 3], 0, 0, 1, 0, 0, 0]));
    if (one.status !== ScsiStatus.good || (one.dataIn![1] & 7) !== 3) t.fail(`opcode ${op.toString(16)} not reported as supported`);
  }
  const unknown = await run(u, 'a3 0c 01 c0 00 00 00 00 01 00 00 00');
  t.equal(unknown.dataIn![1] & 7, 1, 'an unknown opcode is reported as not supported');
  t.equal(asc(await run(u, 'c0 00 00 00 00 00')), 0x2000, 'and running it says INVALID COMMAND OPERATION CODE');
});

t.test('random CDBs never throw and always give well-formed status', async (t) => {
  const { lu: u } = lu(new MemoryBackend(512, 1024));
  await fc.assert(
    fc.asyncProperty(fc.uint8Array({ minLength: 6, maxLength: 16 }), fc.option(fc.uint8Array({ maxLength: 2048 })), async (cdb, data) => {
      const r = await run(u, Buffer.from(cdb), data ? Buffer.from(data) : null, nexusA, data?.length ?? 512);
      if (r.status === ScsiStatus.checkCondition) return !!r.sense && (r.sense[0] & 0x7e) === 0x70 || (r.sense![0] & 0x7f) === 0x72;
      return [ScsiStatus.good, ScsiStatus.reservationConflict, ScsiStatus.conditionMet].includes(r.status as 0);
    }),
    { numRuns: 2000 },
  );
  t.pass('2000 random CDBs');
});
