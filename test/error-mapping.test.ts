// Issue 15 item 11: store errors and cross-peer errors reach the host as a real target would
// answer, chosen by what initiators retry: a read failure is MEDIUM ERROR / UNRECOVERED READ
// ERROR (03/11/00), a write failure MEDIUM ERROR / WRITE ERROR (03/0C/00), a full file system
// under a thin volume DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (07/27/07), a
// transient state BUSY, a copy nobody can reach ABORTED COMMAND 0B/08/00 (08/01 on time-out),
// however many peers away; HARDWARE ERROR (04/44/00) only for what nobody classified (a bug).
// Faults are injected from here: a store decorator that throws what the file system would
// (src/store/decorator.ts), /dev/full for a real ENOSPC, a stopped peer.

import t from 'tap';
import { existsSync } from 'node:fs';
import { ErrorKind, errorKindOf, NoSpaceError, PeersanError, PeerUnavailableError, ReadOnlyError, StoreReadError, StoreWriteError } from '../src/errors';
import { pageBlocks } from '../src/limits';
import { decodeReply, encodeReply, failure, replyError, ReplyStatus } from '../src/routing/frame';
import { PageMovedError } from '../src/routing/moved';
import { BlockLogicalUnit } from '../src/scsi/device';
import { failedCommand, senseForKind } from '../src/scsi/sense';
import { ScsiStatus, type LogicalUnit, type Nexus, type ScsiResult } from '../src/scsi/types';
import { DataFile } from '../src/store/data-file';
import { BackendDecorator } from '../src/store/decorator';
import type { BlockBackend, CompareAndWriteResult, LbaExtent, WriteOptions } from '../src/store/types';
import { startGroup } from './helpers/group';
import { MemoryBackend } from './helpers/memory-backend';

const nexus: Nexus = { initiatorPort: 'iqn.test:h,i,0x1', initiatorName: 'iqn.test:h', targetPort: 'iqn.t,t,0x0001', relativeTargetPort: 1 };

/** What fs would throw: a SystemError with an errno code. */
function systemError(code: string, syscall: string): Error {
  return Object.assign(new Error(`${code}: ${syscall} failed`), { code, syscall, errno: -1 });
}

/** A store that fails the operations given, with the error given (faults injected by the test). */
class FailingBackend extends BackendDecorator {
  constructor(
    inner: BlockBackend,
    readonly fail: { read?: Error; write?: Error },
  ) {
    super(inner);
  }
  read(lba: number, blocks: number): Promise<Buffer> {
    return this.fail.read ? Promise.reject(this.fail.read) : this.inner.read(lba, blocks);
  }
  write(lba: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    return this.fail.write ? Promise.reject(this.fail.write) : this.inner.write(lba, data, opts);
  }
  unmap(lba: number, blocks: number, opts?: WriteOptions): Promise<void> {
    return this.fail.write ? Promise.reject(this.fail.write) : this.inner.unmap(lba, blocks, opts);
  }
  compareAndWrite(lba: number, compare: Buffer, data: Buffer, opts?: WriteOptions): Promise<CompareAndWriteResult> {
    return this.fail.write ? Promise.reject(this.fail.write) : this.inner.compareAndWrite(lba, compare, data, opts);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  lbaStatus(lba: number, blocksMax: number): Promise<LbaExtent[]> {
    return this.inner.lbaStatus(lba, blocksMax);
  }
}

function cdb10(op: number, lba: number, blocks: number): Buffer {
  const c = Buffer.alloc(10);
  c[0] = op;
  c.writeUInt32BE(lba, 2);
  c.writeUInt16BE(blocks, 7);
  return c;
}
const read10 = (lba: number, blocks: number): Buffer => cdb10(0x28, lba, blocks);
const write10 = (lba: number, blocks: number): Buffer => cdb10(0x2a, lba, blocks);

function run(lu: LogicalUnit, cdb: Buffer, dataOut: Buffer | null = null): Promise<ScsiResult> {
  return lu.execute({ cdb, lun: 0, nexus, taskAttr: 1, expectedDataLength: dataOut?.length ?? cdb.readUInt16BE(7) * 512, dataOut });
}

/** "GOOD", "BUSY" or "CHECK CONDITION kk/aa/qq" (fixed or descriptor sense). */
function answer(r: ScsiResult): string {
  if (r.status === ScsiStatus.good) return 'GOOD';
  if (r.status === ScsiStatus.busy) return 'BUSY';
  const s = r.sense!;
  const descriptor = (s[0] & 0x7f) === 0x72;
  const [key, asc, ascq] = descriptor ? [s[1] & 0x0f, s[2], s[3]] : [s[2] & 0x0f, s[12], s[13]];
  const hex = (n: number): string => n.toString(16).padStart(2, '0');
  return `CHECK CONDITION ${hex(key)}/${hex(asc)}/${hex(ascq)}`;
}

t.test('the mapping table: every kind has its answer', async (t) => {
  const want: Record<number, string> = {
    [ErrorKind.other]: 'CHECK CONDITION 04/44/00',
    [ErrorKind.storeRead]: 'CHECK CONDITION 03/11/00',
    [ErrorKind.storeWrite]: 'CHECK CONDITION 03/0c/00',
    [ErrorKind.noSpace]: 'CHECK CONDITION 07/27/07',
    [ErrorKind.busy]: 'BUSY',
    [ErrorKind.unavailable]: 'CHECK CONDITION 0b/08/00',
    [ErrorKind.timedOut]: 'CHECK CONDITION 0b/08/01',
    [ErrorKind.readOnly]: 'CHECK CONDITION 07/27/00',
    [ErrorKind.invalid]: 'CHECK CONDITION 0b/08/00',
  };
  t.same(Object.keys(senseForKind).map(Number).sort(), Object.values(ErrorKind).sort(), 'one answer per kind');
  for (const kind of Object.values(ErrorKind)) {
    t.equal(answer(failedCommand(kind, false)), want[kind], `kind ${kind}, fixed sense`);
    t.equal(answer(failedCommand(kind, true)), want[kind], `kind ${kind}, descriptor sense`);
  }
  const busy = failedCommand(ErrorKind.busy, false);
  t.equal(busy.sense, undefined, 'BUSY carries no sense');
});

t.test('errors are classified by kind; system errors by what the command was doing', async (t) => {
  t.equal(errorKindOf(systemError('EIO', 'read'), false), ErrorKind.storeRead);
  t.equal(errorKindOf(systemError('EIO', 'write'), true), ErrorKind.storeWrite);
  t.equal(errorKindOf(systemError('ENOSPC', 'write'), true), ErrorKind.noSpace);
  t.equal(errorKindOf(systemError('EDQUOT', 'write'), true), ErrorKind.noSpace);
  t.equal(errorKindOf(new StoreReadError('x'), true), ErrorKind.storeRead, 'a typed error keeps its kind whatever the command');
  t.equal(errorKindOf(new StoreWriteError('x'), false), ErrorKind.storeWrite);
  t.equal(errorKindOf(new NoSpaceError('x'), true), ErrorKind.noSpace);
  t.equal(errorKindOf(new PeerUnavailableError('p2', 'down', false), false), ErrorKind.unavailable);
  t.equal(errorKindOf(new PeerUnavailableError('p2', 'late', true), false), ErrorKind.timedOut);
  t.equal(errorKindOf(new PeerUnavailableError('p2', 'stream broke', false, { transient: true }), false), ErrorKind.busy);
  t.equal(errorKindOf(new PageMovedError(3, { owner: 'p2', version: 9 }), true), ErrorKind.busy, 'MOVED retries used up: the route is in flux');
  t.equal(errorKindOf(new ReadOnlyError('snapshot'), true), ErrorKind.readOnly);
  t.equal(errorKindOf(new Error('a bug'), false), ErrorKind.other);
  t.equal(errorKindOf(new PeersanError('unclassified'), false), ErrorKind.other);
  t.equal(errorKindOf(Object.assign(new Error('x'), { code: 'PEERSAN_ERR_X' }), false), ErrorKind.other, 'only errno codes count as system errors');
});

t.test('a failed reply carries the kind across a peer, not text', async (t) => {
  for (const kind of Object.values(ErrorKind)) {
    const frame = encodeReply({ id: 9, owner: 'p2', version: 0, ...failure(kind, 'why') });
    const err = replyError('p2', decodeReply(frame)!);
    t.equal(err.kind, kind, `kind ${kind} survives the wire`);
  }
  const long = failure(ErrorKind.storeRead, 'x'.repeat(100_000));
  t.ok(long.payload!.length <= 512, 'the message is bounded');
  const unknown = replyError('p2', { id: 1, status: ReplyStatus.failed, owner: 'p2', version: 0, detail: 200 });
  t.equal(unknown.kind, ErrorKind.other, 'an unknown kind from a newer or broken peer is unclassified');
  t.equal(replyError('p2', { id: 1, status: ReplyStatus.noVolume, owner: 'p2', version: 0, detail: 0 }).kind, ErrorKind.busy, 'a peer that has not opened the volume yet: retry');
});

t.test('the store\'s file errors are typed where the file is written', { skip: existsSync('/dev/full') ? false : 'no /dev/full' }, async (t) => {
  const full = await DataFile.open('/dev/full');
  t.teardown(() => full.close());
  const err = await full.write(Buffer.alloc(4096), 0, 4096, 0).then(() => undefined, (e: unknown) => e);
  t.ok(err instanceof NoSpaceError, `ENOSPC from the file system is NoSpaceError (${String(err)})`);
});

t.test('the logical unit answers store and routing errors with sense, never by throwing', async (t) => {
  const cases: [string, { read?: Error; write?: Error }, 'read' | 'write', string][] = [
    ['EIO on read', { read: systemError('EIO', 'read') }, 'read', 'CHECK CONDITION 03/11/00'],
    ['EIO on write', { write: systemError('EIO', 'write') }, 'write', 'CHECK CONDITION 03/0c/00'],
    ['ENOSPC on write', { write: systemError('ENOSPC', 'write') }, 'write', 'CHECK CONDITION 07/27/07'],
    ['owner unreachable', { read: new PeerUnavailableError('p2', 'not reachable', false) }, 'read', 'CHECK CONDITION 0b/08/00'],
    ['owner timed out', { write: new PeerUnavailableError('p2', 'no answer', true) }, 'write', 'CHECK CONDITION 0b/08/01'],
    ['stream to the owner broke', { write: new PeerUnavailableError('p2', 'stream ended', false, { transient: true }) }, 'write', 'BUSY'],
    ['MOVED retries used up', { write: new PageMovedError(0, { owner: 'p2', version: 5 }) }, 'write', 'BUSY'],
    ['a bug', { read: new TypeError('x is undefined') }, 'read', 'CHECK CONDITION 04/44/00'],
  ];
  for (const [what, fail, op, want] of cases) {
    const lu = new BlockLogicalUnit({ lun: 0, backend: new FailingBackend(new MemoryBackend(), fail), identity: { volumeId: '0123456789abcdef', volumeName: 'v', vendor: 'PEERSAN', product: 'p', revision: '0', readOnly: false } });
    const r = op === 'read' ? await run(lu, read10(0, 8)) : await run(lu, write10(0, 8), Buffer.alloc(4096));
    t.equal(answer(r), want, what);
  }
});

t.test('through a forwarding peer, the host hears the owner\'s meaning', async (t) => {
  const g = await startGroup(t, 3, { migration: { rateMBps: 2 } }); // a 4 MiB page moves in about 2 s
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '48M' });
  const record = g.peer('p1').core.catalog.require('vol');
  // Pages: 0 → p1, 1 → p2, 2 → p3. The host talks to p1; page 1 is forwarded to p2.
  const lu = g.peer('p1').core.targets.find('iqn.2026-11.io.peersan:vol')!.luns.get(0)!;
  const page1 = pageBlocks;
  const data = Buffer.alloc(8 * 512, 0x3c);
  t.equal(answer(await run(lu, write10(page1, 8), data)), 'GOOD', 'a forwarded write');

  const served = g.peer('p2').core.targets.served(record.id)!;
  const healthy = served.store;
  const inject = (fail: { read?: Error; write?: Error }): void => {
    served.store = new FailingBackend(healthy, fail);
  };
  t.teardown(() => void (served.store = healthy));

  inject({ read: systemError('EIO', 'pread') });
  t.equal(answer(await run(lu, read10(page1, 8))), 'CHECK CONDITION 03/11/00', "EIO on the owner's read: MEDIUM ERROR / UNRECOVERED READ ERROR");
  inject({ write: systemError('EIO', 'pwrite') });
  t.equal(answer(await run(lu, write10(page1, 8), data)), 'CHECK CONDITION 03/0c/00', "EIO on the owner's write: MEDIUM ERROR / WRITE ERROR");
  inject({ write: systemError('ENOSPC', 'pwrite') });
  t.equal(answer(await run(lu, write10(page1, 8), data)), 'CHECK CONDITION 07/27/07', "ENOSPC on the owner's thin volume: SPACE ALLOCATION FAILED WRITE PROTECT");
  served.store = healthy;
  t.equal(answer(await run(lu, read10(page1, 8))), 'GOOD', 'healthy again');

  await t.test('two hops: the owner forwards to a move destination that is down', async (t) => {
    // Page 0 (p1's) moves to p3; the host writes it through p2, so: host → p2 → p1 → p3.
    const viaP2 = g.peer('p2').core.targets.find('iqn.2026-11.io.peersan:vol')!.luns.get(0)!;
    await g.peer('p1').admin.movePage('vol', 0, 'p3');
    const src = g.peer('p1');
    for (let i = 0; i < 200 && (src.core.migrator.list()[0]?.done ?? 0) < 4; i++) await new Promise((r) => setTimeout(r, 50));
    t.ok((src.core.migrator.list()[0]?.done ?? 0) >= 4, 'some pieces are on the destination');
    await g.peer('p3').stop();
    // The first pieces are at home on p3 now: their reads and writes need p3.
    const answers = new Set<string>();
    for (let i = 0; i < 2; i++) {
      answers.add(answer(await run(viaP2, write10(0, 8), data)));
      answers.add(answer(await run(viaP2, read10(0, 8))));
    }
    const seen = [...answers].sort();
    t.notOk(answers.has('CHECK CONDITION 04/44/00'), `never HARDWARE ERROR for a peer that is down (${seen.join(', ')})`);
    // p3 down also changes its port group's ALUA state: the first command after that may get the
    // unit attention ASYMMETRIC ACCESS STATE CHANGED (06/2A/06), which hosts retry.
    const failures = seen.filter((a) => a !== 'CHECK CONDITION 06/2a/06');
    t.ok(failures.every((a) => a === 'BUSY' || a.startsWith('CHECK CONDITION 0b/08/0')), `BUSY or ABORTED COMMAND / COMMUNICATION FAILURE only (${seen.join(', ')})`);
    t.ok(answers.has('CHECK CONDITION 0b/08/00'), 'the down destination is reported as no reachable copy once the retry finds it down');
  });

  await t.test('one hop: the owner stopped', async (t) => {
    await g.peer('p2').stop();
    const answers: string[] = [];
    // The ALUA change of p2's port group may come with any of these commands (06/2A/06, which
    // hosts retry): the answer that counts is the last other one.
    for (let i = 0; i < 3 || (i < 6 && answers[answers.length - 1] === 'CHECK CONDITION 06/2a/06'); i++) answers.push(answer(await run(lu, read10(page1, 8))));
    t.notOk(answers.includes('CHECK CONDITION 04/44/00'), `never HARDWARE ERROR (${answers.join(', ')})`);
    t.equal(answers.filter((a) => a !== 'CHECK CONDITION 06/2a/06').pop(), 'CHECK CONDITION 0b/08/00', `once the owner is found down: ABORTED COMMAND / LOGICAL UNIT COMMUNICATION FAILURE (${answers.join(', ')})`);
  });
});
