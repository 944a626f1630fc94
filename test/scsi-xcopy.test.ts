// EXTENDED COPY (LID1) and RECEIVE COPY RESULTS: the parameter-list parser on golden and
// malformed lists, and copies within one logical unit and to another through copyTargets.

import t from 'tap';
import fc from 'fast-check';
import { naaIdentifier } from '../src/scsi/inquiry';
import { BlockLogicalUnit } from '../src/scsi/device';
import { ScsiStatus, type Nexus, type ScsiResult } from '../src/scsi/types';
import { parse, XcopyAsc } from '../src/scsi/xcopy';
import { MemoryBackend } from './helpers/memory-backend';

const nexus: Nexus = { initiatorPort: 'iqn.test:a,i,0x1', initiatorName: 'iqn.test:a', targetPort: 't,t,0x1', relativeTargetPort: 1 };

function cscd(designator: Buffer, opts: { type?: number; nul?: boolean; luIdType?: number } = {}): Buffer {
  const d = Buffer.alloc(32);
  d[0] = opts.type ?? 0xe4;
  d[1] = ((opts.luIdType ?? 0) << 6) | (opts.nul ? 0x20 : 0);
  d[4] = 1;
  d[5] = 3; // NAA
  d[7] = designator.length;
  designator.copy(d, 8);
  d.writeUIntBE(512, 29, 3);
  return d;
}

function segment(src: number, dst: number, blocks: number, srcLba: number, dstLba: number, type = 0x02): Buffer {
  const d = Buffer.alloc(28);
  d[0] = type;
  d.writeUInt16BE(24, 2);
  d.writeUInt16BE(src, 4);
  d.writeUInt16BE(dst, 6);
  d.writeUInt16BE(blocks, 10);
  d.writeBigUInt64BE(BigInt(srcLba), 12);
  d.writeBigUInt64BE(BigInt(dstLba), 20);
  return d;
}

function list(listId: number, usage: number, cscds: Buffer[], segments: Buffer[]): Buffer {
  const h = Buffer.alloc(16);
  h[0] = listId;
  h[1] = usage << 3;
  const c = Buffer.concat(cscds);
  const s = Buffer.concat(segments);
  h.writeUInt16BE(c.length, 2);
  h.writeUInt32BE(s.length, 8);
  return Buffer.concat([h, c, s]);
}

function xcopyCdb(bytes: number): Buffer {
  const cdb = Buffer.alloc(16);
  cdb[0] = 0x83;
  cdb.writeUInt32BE(bytes, 10);
  return cdb;
}

const ascOf = (r: ScsiResult): number => r.sense!.readUInt16BE(12);
const keyOf = (r: ScsiResult): number => r.sense![2] & 0x0f;

function setup() {
  const a = new MemoryBackend(512, 8192, 8);
  const b = new MemoryBackend(512, 8192, 8);
  const idA = '00000000000000aa';
  const idB = '00000000000000bb';
  const lu = new BlockLogicalUnit({
    lun: 0,
    identity: { volumeId: idA, volumeName: 'a', vendor: 'PEERSAN', product: 'test', revision: '0', readOnly: false },
    backend: a,
    copyTargets: (d) => (d.equals(naaIdentifier(idB)) ? b : undefined),
  });
  const run = (cdb: Buffer, data: Buffer | null = null): Promise<ScsiResult> => lu.execute({ cdb, lun: 0, nexus, taskAttr: 1, expectedDataLength: data?.length ?? 0, dataOut: data });
  return { a, b, lu, run, naaA: naaIdentifier(idA), naaB: naaIdentifier(idB) };
}

t.test('parser: golden list, lengths, counts, types', async (t) => {
  const naa = naaIdentifier('0123456789abcdef');
  const good = list(7, 2, [cscd(naa)], [segment(0, 0, 16, 1, 100)]);
  const r = parse(good, good.length);
  t.ok(r.ok);
  if (r.ok) {
    t.equal(r.list!.listId, 7);
    t.equal(r.list!.listIdUsage, 2);
    t.ok(r.list!.cscds[0].designator.equals(naa));
    t.same(r.list!.segments, [{ sourceIndex: 0, destinationIndex: 0, blocks: 16, sourceLba: 1, destinationLba: 100 }]);
  }
  t.same(parse(Buffer.alloc(0), 0), { ok: true, list: undefined }, 'zero length: nothing to do');
  const short = parse(good.subarray(0, 47), 47);
  t.ok(!short.ok && short.error.asc === 0x1a00, 'truncated list: parameter list length error');
  const manyTargets = list(1, 0, Array.from({ length: 9 }, () => cscd(naa)), [segment(0, 0, 1, 0, 0)]);
  const m = parse(manyTargets, manyTargets.length);
  t.ok(!m.ok && m.error.asc === XcopyAsc.tooManyTargetDescriptors);
  const manySegments = list(1, 0, [cscd(naa)], Array.from({ length: 9 }, () => segment(0, 0, 1, 0, 0)));
  const s = parse(manySegments, manySegments.length);
  t.ok(!s.ok && s.error.asc === XcopyAsc.tooManySegmentDescriptors);
  const tooLong = list(1, 0, Array.from({ length: 9 }, () => cscd(naa)), Array.from({ length: 9 }, () => segment(0, 0, 1, 0, 0)));
  const l = parse(tooLong, tooLong.length);
  t.ok(!l.ok && l.error.asc === 0x1a00, 'over the descriptor list limit: length error before the counts');
  const fc0 = list(1, 0, [cscd(naa, { type: 0xe0 })], [segment(0, 0, 1, 0, 0)]);
  const f = parse(fc0, fc0.length);
  t.ok(!f.ok && f.error.asc === XcopyAsc.unsupportedTargetDescriptorTypeCode);
  const stream = list(1, 0, [cscd(naa)], [segment(0, 0, 1, 0, 0, 0x03)]);
  const st = parse(stream, stream.length);
  t.ok(!st.ok && st.error.asc === XcopyAsc.unsupportedSegmentDescriptorTypeCode);
  const reserved = list(1, 0, [cscd(naa, { luIdType: 2 })], [segment(0, 0, 1, 0, 0)]);
  t.ok(parse(reserved, reserved.length).ok, 'LU ID TYPE is not checked (the designator names the volume)');
  const usage1 = list(1, 1, [cscd(naa)], [segment(0, 0, 1, 0, 0)]);
  const u = parse(usage1, usage1.length);
  t.ok(!u.ok && u.error.asc === 0x2600, 'reserved LIST ID USAGE: invalid field');
  fc.assert(fc.property(fc.uint8Array({ maxLength: 600 }), fc.nat(700), (bytes, n) => {
    parse(Buffer.from(bytes), n);
  }));
});

t.test('copy within the LU, to another LU, and the copy results', async (t) => {
  const { a, b, run, naaA, naaB } = setup();
  a.data.fill(0x41, 0, 16 * 512);
  const inside = list(1, 0, [cscd(naaA)], [segment(0, 0, 16, 0, 4096)]);
  t.equal((await run(xcopyCdb(inside.length), inside)).status, ScsiStatus.good);
  t.ok(a.data.subarray(4096 * 512, 4112 * 512).equals(Buffer.alloc(16 * 512, 0x41)), 'copied within the volume');
  const status = await run(Buffer.from('8400010000000000000000000400' + '0000', 'hex'));
  t.equal(status.status, ScsiStatus.good);
  t.equal(status.dataIn![4], 0x01, 'COPY STATUS: completed without errors');
  t.equal(status.dataIn!.readUInt32BE(8), 8, '8 KiB moved');
  const across = list(2, 2, [cscd(naaA), cscd(naaB)], [segment(0, 1, 16, 0, 100)]);
  t.equal((await run(xcopyCdb(across.length), across)).status, ScsiStatus.good);
  t.ok(b.data.subarray(100 * 512, 116 * 512).equals(Buffer.alloc(16 * 512, 0x41)), 'copied to the other volume');
  t.equal(keyOf(await run(Buffer.from('8400020000000000000000000400' + '0000', 'hex'))), 0x05, 'list id 2 was not held (usage 10b)');
  const params = await run(Buffer.from('8403000000000000000000000100' + '0000', 'hex'));
  t.equal(params.dataIn!.readUInt16BE(8), 8, 'operating parameters: 8 CSCDs');
  t.equal(params.dataIn!.readUInt32BE(12), 512);
});

t.test('unreachable targets and ranges abort the copy', async (t) => {
  const { run, naaA } = setup();
  const unknown = list(1, 0, [cscd(naaIdentifier('00000000000000cc'))], [segment(0, 0, 1, 0, 0)]);
  let r = await run(xcopyCdb(unknown.length), unknown);
  t.equal(keyOf(r), 0x0a, 'COPY ABORTED');
  t.equal(ascOf(r), XcopyAsc.unreachableCopyTarget);
  const nul = list(1, 0, [cscd(naaA, { nul: true })], [segment(0, 0, 1, 0, 0)]);
  r = await run(xcopyCdb(nul.length), nul);
  t.equal(keyOf(r), 0x0a, 'NUL device: COPY ABORTED');
  const badIndex = list(1, 0, [cscd(naaA)], [segment(0, 1, 1, 0, 0)]);
  t.equal(keyOf(await run(xcopyCdb(badIndex.length), badIndex)), 0x0a, 'destination index out of the list');
  const beyond = list(1, 0, [cscd(naaA)], [segment(0, 0, 2048, 0, 8191)]);
  r = await run(xcopyCdb(beyond.length), beyond);
  t.equal(keyOf(r), 0x0a, 'beyond the end: COPY ABORTED');
  const status = await run(Buffer.from('8400010000000000000000000400' + '0000', 'hex'));
  t.equal(status.dataIn![4], 0x02, 'held result says: completed with errors');
});
