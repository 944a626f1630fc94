import t from 'tap';
import fc from 'fast-check';
import { crc32c } from '../src/iscsi/digest';
import { decodePdu, encodePdu, encodePduToBuffer } from '../src/iscsi/pdu';
import { PduParser, type ParseEvent } from '../src/iscsi/parser';
import { Op, RejectReason, type Pdu, type ScsiCommandPdu } from '../src/iscsi/types';

const lun0 = Buffer.alloc(8);

function scsiWrite(data: Buffer): ScsiCommandPdu {
  return {
    opcode: Op.scsiCommand, immediate: false, final: true, initiatorTaskTag: 0x11223344, data,
    read: false, write: true, taskAttr: 1, lun: lun0, expectedDataTransferLength: 4096,
    cmdSN: 7, expStatSN: 9, cdb: Buffer.from('2a000000001000000800' + '000000000000', 'hex'),
  };
}

function drain(parser: PduParser): ParseEvent[] {
  const out: ParseEvent[] = [];
  for (let ev = parser.next(); ev; ev = parser.next()) out.push(ev);
  return out;
}

t.test('CRC32C matches the RFC 3720 appendix B vectors', async (t) => {
  t.equal(crc32c(Buffer.alloc(32)), 0x8a9136aa, '32 bytes of zeros');
  t.equal(crc32c(Buffer.alloc(32, 0xff)), 0x62a8ab43, '32 bytes of 0xff');
  const incrementing = Buffer.from(Array.from({ length: 32 }, (_, i) => i));
  t.equal(crc32c(incrementing), 0x46dd794e, '32 incrementing bytes');
  t.equal(crc32c(incrementing.subarray(0, 10), incrementing.subarray(10)), 0x46dd794e, 'split input');
});

t.test('golden SCSI command with immediate data', async (t) => {
  const pdu = scsiWrite(Buffer.from('abcde'));
  const bytes = encodePduToBuffer(pdu);
  // BHS: opcode, flags (F|W|simple), AHS 0, DSL 5, ITT, EDTL, CmdSN, ExpStatSN, CDB; data padded to 8.
  t.equal(bytes.length, 48 + 8);
  t.equal(bytes[0], 0x01);
  t.equal(bytes[1], 0x80 | 0x20 | 0x01);
  t.equal(bytes.readUIntBE(5, 3), 5);
  t.equal(bytes.readUInt32BE(16), 0x11223344);
  t.equal(bytes.readUInt32BE(20), 4096);
  t.equal(bytes.readUInt32BE(24), 7);
  t.equal(bytes[32], 0x2a);
  t.same(bytes.subarray(48, 56), Buffer.from([0x61, 0x62, 0x63, 0x64, 0x65, 0, 0, 0]));
  const back = decodePdu(bytes.subarray(0, 48), undefined, bytes.subarray(48, 53)) as ScsiCommandPdu;
  t.equal(back.opcode, Op.scsiCommand);
  t.equal(back.write, true);
  t.equal(back.expectedDataTransferLength, 4096);
  t.same(back.data, Buffer.from('abcde'));
});

t.test('golden Data-In with status and a login response', async (t) => {
  const dataIn: Pdu = {
    opcode: Op.dataIn, immediate: false, final: true, initiatorTaskTag: 5, data: Buffer.alloc(512, 7), acknowledge: false,
    overflow: false, underflow: true, hasStatus: true, status: 0, lun: lun0, targetTransferTag: 0xffffffff,
    statSN: 100, expCmdSN: 10, maxCmdSN: 137, dataSN: 3, bufferOffset: 1536, residualCount: 512,
  };
  const b = encodePduToBuffer(dataIn);
  t.equal(b[0], 0x25);
  t.equal(b[1], 0x80 | 0x02 | 0x01, 'F, U, S');
  t.equal(b.readUInt32BE(24), 100);
  t.equal(b.readUInt32BE(36), 3);
  t.equal(b.readUInt32BE(40), 1536);
  t.equal(b.readUInt32BE(44), 512);
  const login: Pdu = {
    opcode: Op.loginResponse, immediate: false, final: true, transit: true, continue: false, csg: 1, nsg: 3,
    versionMax: 0, versionActive: 0, isid: Buffer.from('400001370000', 'hex'), tsih: 9, initiatorTaskTag: 1,
    statSN: 1, expCmdSN: 2, maxCmdSN: 129, status: 0x0201, data: Buffer.alloc(0),
  };
  const l = encodePduToBuffer(login);
  t.equal(l[1], 0x80 | (1 << 2) | 3, 'T, CSG=1, NSG=3');
  t.equal(l.readUInt16BE(14), 9);
  t.equal(l[36], 0x02);
  t.equal(l[37], 0x01);
});

const pduArbitrary: fc.Arbitrary<Pdu> = fc
  .record({
    itt: fc.integer({ min: 0, max: 0xffffffff }),
    sn: fc.integer({ min: 0, max: 0xffffffff }),
    sn2: fc.integer({ min: 0, max: 0xffffffff }),
    data: fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)),
    flag: fc.boolean(),
    small: fc.integer({ min: 0, max: 3 }),
  })
  .chain((r) =>
    fc.constantFrom<Pdu>(
      { opcode: Op.nopOut, immediate: r.flag, final: true, initiatorTaskTag: r.itt, data: r.data, lun: lun0, targetTransferTag: r.sn2, cmdSN: r.sn, expStatSN: r.sn2 },
      { ...scsiWrite(r.data), initiatorTaskTag: r.itt, cmdSN: r.sn },
      { opcode: Op.dataOut, immediate: false, final: r.flag, initiatorTaskTag: r.itt, data: r.data, lun: lun0, targetTransferTag: r.sn2, expStatSN: r.sn, dataSN: r.small, bufferOffset: r.sn2 },
      { opcode: Op.textRequest, immediate: r.flag, final: true, continue: false, initiatorTaskTag: r.itt, data: r.data, lun: lun0, targetTransferTag: 0xffffffff, cmdSN: r.sn, expStatSN: r.sn2 },
      { opcode: Op.r2t, immediate: false, final: true, initiatorTaskTag: r.itt, data: Buffer.alloc(0), lun: lun0, targetTransferTag: r.sn, statSN: r.sn2, expCmdSN: r.sn, maxCmdSN: r.sn2, r2tSN: r.small, bufferOffset: r.sn, desiredDataTransferLength: r.sn2 },
      { opcode: Op.reject, immediate: false, final: true, initiatorTaskTag: 0xffffffff, data: r.data, reason: 9, statSN: r.sn, expCmdSN: r.sn2, maxCmdSN: r.sn, dataSN: 0 },
      { opcode: Op.logoutRequest, immediate: r.flag, final: true, initiatorTaskTag: r.itt, data: Buffer.alloc(0), reasonCode: r.small % 3, cid: 1, cmdSN: r.sn, expStatSN: r.sn2 },
    ),
  );

t.test('every PDU survives encode → parse in any chunking, with and without digests', async (t) => {
  fc.assert(
    fc.property(fc.array(pduArbitrary, { minLength: 1, maxLength: 5 }), fc.boolean(), fc.boolean(), fc.integer({ min: 1, max: 97 }), (pdus, hd, dd, chunk) => {
      const stream = Buffer.concat(pdus.map((p) => encodePduToBuffer(p, { header: hd, data: dd })));
      const parser = new PduParser({ maxRecvDataSegmentBytes: 8192, headerDigest: hd, dataDigest: dd });
      const events: ParseEvent[] = [];
      for (let off = 0; off < stream.length; off += chunk) {
        parser.push(stream.subarray(off, off + chunk));
        events.push(...drain(parser));
      }
      if (events.length !== pdus.length) return false;
      return events.every((ev, i) => ev.kind === 'pdu' && ev.pdu.opcode === pdus[i].opcode && ev.pdu.initiatorTaskTag === pdus[i].initiatorTaskTag && ev.pdu.data.equals(pdus[i].data));
    }),
    { numRuns: 300 },
  );
});

t.test('one PDU split at every offset parses the same', async (t) => {
  const bytes = encodePduToBuffer(scsiWrite(Buffer.alloc(100, 3)), { header: true, data: true });
  for (let cut = 1; cut < bytes.length; cut++) {
    const p = new PduParser({ maxRecvDataSegmentBytes: 8192, headerDigest: true, dataDigest: true });
    p.push(bytes.subarray(0, cut));
    const early = p.next();
    p.push(bytes.subarray(cut));
    const ev = early ?? p.next();
    if (!ev || ev.kind !== 'pdu' || ev.pdu.data.length !== 100) {
      t.fail(`split at ${cut}`);
      return;
    }
  }
  t.pass('all offsets');
});

t.test('digest errors: header → fatal, data → reject and go on', async (t) => {
  const good = encodePduToBuffer(scsiWrite(Buffer.alloc(16, 1)), { header: true, data: true });
  const badHeader = Buffer.from(good);
  badHeader[20] ^= 1;
  const p1 = new PduParser({ maxRecvDataSegmentBytes: 8192, headerDigest: true, dataDigest: true });
  p1.push(badHeader);
  t.equal(p1.next()?.kind, 'fatal');
  t.equal(p1.next(), undefined, 'nothing after fatal');

  const badData = Buffer.from(good);
  badData[48 + 4 + 3] ^= 0xff;
  const p2 = new PduParser({ maxRecvDataSegmentBytes: 8192, headerDigest: true, dataDigest: true });
  p2.push(Buffer.concat([badData, good]));
  const ev = p2.next();
  t.equal(ev?.kind, 'reject');
  t.equal(ev?.kind === 'reject' && ev.reason, RejectReason.dataDigestError);
  t.equal(p2.next()?.kind, 'pdu', 'the next PDU still parses');
});

t.test('lengths are bounded before allocation', async (t) => {
  const huge = Buffer.alloc(48);
  huge[0] = Op.scsiCommand;
  huge.writeUIntBE(0xffffff, 5, 3);
  const p = new PduParser({ maxRecvDataSegmentBytes: 8192, headerDigest: false, dataDigest: false });
  p.push(huge);
  t.equal(p.next()?.kind, 'fatal', '16 MiB data segment refused at once');

  const over = encodePduToBuffer(scsiWrite(Buffer.alloc(9000)));
  const p2 = new PduParser({ maxRecvDataSegmentBytes: 8192, headerDigest: false, dataDigest: false });
  p2.push(over);
  t.equal(p2.next()?.kind, 'reject', 'over the negotiated size but under the hard limit: skipped with a Reject');
  const unknown = Buffer.alloc(48);
  unknown[0] = 0x1e;
  p2.push(unknown);
  const ev = p2.next();
  t.equal(ev?.kind === 'reject' && ev.reason, RejectReason.commandNotSupported, 'unknown opcode');
});

t.test('random bytes never throw and never buffer more than one PDU', async (t) => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ minLength: 1, maxLength: 200 }), { maxLength: 30 }), fc.boolean(), (chunks, digests) => {
      const p = new PduParser({ maxRecvDataSegmentBytes: 8192, headerDigest: digests, dataDigest: digests });
      for (const c of chunks) {
        p.push(Buffer.from(c));
        for (let ev = p.next(); ev; ev = p.next()) {
          if (ev.kind === 'fatal') return true;
        }
        if (p.bufferedBytes > 48 + 1020 + 4 + 1024 * 1024 + 8) return false;
      }
      return true;
    }),
    { numRuns: 500 },
  );
});

t.test('encodePdu does not copy a large data segment', async (t) => {
  const data = Buffer.alloc(256 * 1024, 9);
  const chunks = encodePdu(scsiWrite(data), { header: false, data: false });
  t.equal(chunks[1], data, 'same buffer object');
});

t.test('an oversize data segment is rejected at its header and never buffered (issue 15)', async (t) => {
  // 1 MiB claimed (the hard maximum) where 8 KiB is negotiated: rejected before its data arrives.
  const over = encodePduToBuffer(scsiWrite(Buffer.alloc(1024 * 1024, 7)));
  const next = encodePduToBuffer(scsiWrite(Buffer.alloc(512, 1)));
  const p = new PduParser({ maxRecvDataSegmentBytes: 8192, headerDigest: false, dataDigest: false });
  p.push(over.subarray(0, 48 + 4096));
  t.equal(p.next()?.kind, 'reject', 'rejected once the header is in');
  let most = p.bufferedBytes;
  for (let off = 48 + 4096; off < over.length; off += 64 * 1024) {
    p.push(over.subarray(off, Math.min(off + 64 * 1024, over.length)));
    t.equal(p.next(), undefined, 'nothing more from the discarded segment');
    most = Math.max(most, p.bufferedBytes);
  }
  t.ok(most <= 8192, `at most the negotiated segment buffered meanwhile (${most} bytes)`);
  t.equal(p.hasPartial, false, 'nothing pending once it is all discarded');
  p.push(next.subarray(0, 30));
  t.equal(p.hasPartial, true, 'half a header pending');
  p.push(next.subarray(30));
  const ev = p.next();
  t.equal(ev?.kind, 'pdu', 'the stream goes on with the next PDU');
});
