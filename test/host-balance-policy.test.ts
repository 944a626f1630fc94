// Host balancing without sockets: the placement rule (no loops, property-tested), the
// balancer's memory (bursts, came-back, planned moves, automatic move limits), the login
// redirect answer, the session's Logout with commands still waiting for data, and the config.

import t from 'tap';
import fc from 'fast-check';
import pino from 'pino';
import { LoginMachine, type LoginContext } from '../src/iscsi/login';
import { defaultSessionParams, defaultTargetPrefs } from '../src/iscsi/negotiate';
import { ByteBudget } from '../src/iscsi/budget';
import { peerTaskBytesMax } from '../src/limits';
import { Session } from '../src/iscsi/session';
import type { TargetDirectory, TargetInfo } from '../src/iscsi/target';
import { encodeTextKeys, parseTextKeys } from '../src/iscsi/text';
import { LoginStatus, Op, type InitiatorPdu, type LoginRequestPdu, type TargetPdu } from '../src/iscsi/types';
import { ScsiStatus, type LogicalUnit, type ScsiResult } from '../src/scsi/types';
import { parseConfig } from '../src/server/config';
import {
  defaultHostBalanceSettings,
  HostBalancer,
  loginTarget,
  sessionPortKey,
  type HostBalanceSettings,
  type LoginAttempt,
  type MovableSession,
  type PeerLoad,
} from '../src/server/host-balance';

const s: HostBalanceSettings = { ...defaultHostBalanceSettings };
const target = 'iqn.2026-11.io.peersan:vol';

function peer(id: string, sessions: number, extra: Partial<PeerLoad> = {}): PeerLoad {
  return { peerId: id, iscsiAddress: `127.0.0.1:${3260 + Number(id.slice(1))}`, portalGroupTag: Number(id.slice(1)), up: true, sessions, iops: 0, bytesPerSec: 0, ...extra };
}
const login = (isid: string, initiatorName = 'iqn.h:1', sessionType: 'Normal' | 'Discovery' = 'Normal'): LoginAttempt => ({ initiatorName, isid, targetName: target, sessionType });

t.test('the login rule', async (t) => {
  const idle = [peer('p1', 0), peer('p2', 0), peer('p3', 0)];
  t.equal(loginTarget(idle, 'p1', login('a'), s), undefined, 'all equal: stay');
  t.equal(loginTarget([peer('p1', 1), peer('p2', 0), peer('p3', 0)], 'p1', login('a'), s)?.peerId, 'p2', 'one session more than the best: go to the lowest id among the best');
  t.equal(loginTarget([peer('p1', 1), peer('p2', 0), peer('p3', 0)], 'p1', login('a', 'iqn.h:1', 'Discovery'), s), undefined, 'discovery never');
  t.equal(loginTarget([peer('p1', 3), peer('p2', 0, { up: false }), peer('p3', 2)], 'p1', login('a'), s)?.peerId, 'p3', 'a down peer is never chosen');
  t.equal(loginTarget([peer('p1', 3), peer('p2', 0, { up: false }), peer('p3', 3)], 'p1', login('a'), s), undefined, 'nobody up is better');
  t.equal(loginTarget([peer('p1', 0), peer('p2', 0)], 'p2', login('a'), s), undefined, 'a tie with a lower id is not "clearly better"');
  t.equal(loginTarget([peer('p1', 0, { iops: 10_000 }), peer('p2', 1)], 'p1', login('a'), s)?.peerId, 'p2', 'IOPS weigh in: 10k IOPS are 5 sessions');
  t.equal(loginTarget([peer('p1', 1), peer('p2', 0)], 'p3', login('a'), s), undefined, 'self not in the view: no decision');
  // Locality: p3 owns every page of the volume: worth one session.
  const shares = new Map([['p1', 0], ['p2', 0], ['p3', 1]]);
  t.equal(loginTarget(idle, 'p1', login('a'), s, shares)?.peerId, 'p3', 'idle group: go where the pages are');
  t.equal(loginTarget([peer('p1', 0), peer('p2', 0), peer('p3', 1)], 'p1', login('a'), s, shares), undefined, 'not when the owner already has a session more');
  const even = new Map([['p1', 22 / 64], ['p2', 21 / 64], ['p3', 21 / 64]]);
  t.equal(loginTarget([peer('p1', 1), peer('p2', 0), peer('p3', 0)], 'p1', login('a'), s, even)?.peerId, 'p2', 'an odd page count striped over the peers does not hide a session');
});

t.test('no loop: following the rule from any peer ends within one hop (property)', async (t) => {
  const views = fc.integer({ min: 1, max: 6 }).chain((n) =>
    fc.tuple(
      fc.array(fc.record({ sessions: fc.integer({ min: 0, max: 20 }), up: fc.boolean(), iops: fc.integer({ min: 0, max: 50_000 }), bytesPerSec: fc.integer({ min: 0, max: 500 * 1024 * 1024 }), share: fc.double({ min: 0, max: 1, noNaN: true }) }), { minLength: n, maxLength: n }),
      fc.boolean(),
      fc.integer({ min: 0, max: n - 1 }),
    ),
  );
  fc.assert(
    fc.property(views, ([rows, withShares, start]) => {
      const view = rows.map((r, i) => peer(`p${i + 1}`, r.sessions, { up: r.up, iops: r.iops, bytesPerSec: r.bytesPerSec }));
      const shares = withShares ? new Map(rows.map((r, i) => [`p${i + 1}`, r.share])) : undefined;
      const self = view[start].peerId;
      const first = loginTarget(view, self, login('x'), s, shares);
      if (!first) return true;
      if (first.peerId === self || !first.up) return false;
      // The destination, with the same view, must accept.
      return loginTarget(view, first.peerId, login('x'), s, shares) === undefined;
    }),
    { numRuns: 2000 },
  );
  t.pass('2000 random views: every redirect lands on a peer that accepts');
});

t.test('a burst of logins to one peer spreads before the polled view catches up', async (t) => {
  const b = new HostBalancer('p1', s);
  const view = [peer('p1', 0), peer('p2', 0), peer('p3', 0)];
  // The poll still says 0 everywhere; the balancer adds what only it knows.
  const d1 = b.onLogin(b.adjusted(view, 0), login('a'), 0);
  const d2 = b.onLogin(b.adjusted(view, 1), login('b'), 1);
  const d3 = b.onLogin(b.adjusted(view, 2), login('c'), 2);
  t.same([d1.kind, d2.kind === 'redirect' && d2.to.peerId, d3.kind === 'redirect' && d3.to.peerId], ['accept', 'p2', 'p3']);
  t.same(b.adjusted(view, 3).map((p) => p.sessions), [1, 1, 1], 'accepted login counted here, redirects counted on their destinations');
  b.sessionStarted(sessionPortKey('iqn.h:1', 'a', target));
  t.same(b.adjusted(view, 4).map((p) => p.sessions), [0, 1, 1], 'a started session is the portal\'s to count');
  t.same(b.adjusted(view, 10_000).map((p) => p.sessions), [0, 0, 0], 'redirects stop counting once the view has had time to see them');
});

t.test('an initiator port that comes back after a redirect is accepted', async (t) => {
  const b = new HostBalancer('p1', s);
  const busy = [peer('p1', 2), peer('p2', 0)];
  t.equal(b.onLogin(busy, login('a'), 0).kind, 'redirect');
  t.same(b.onLogin(busy, login('a'), 100), { kind: 'accept', reason: 'came-back' });
  t.equal(b.onLogin(busy, login('b'), 200).kind, 'redirect', 'another initiator port is still placed by the rule');
  t.equal(b.onLogin(busy, login('b'), 200 + s.redirectMemoryMs + 1).kind, 'redirect', 'the memory lasts redirectMemoryMs');
  t.same(b.onLogin(busy, { ...login('c'), pinned: true }, 300), { kind: 'accept', reason: 'pinned' }, 'a host registered through this peer stays');
});

t.test('planned moves: any portal sends the host on, the destination accepts, once', async (t) => {
  const view = [peer('p1', 0), peer('p2', 0), peer('p3', 0)];
  const p1 = new HostBalancer('p1', s);
  const p3 = new HostBalancer('p3', s);
  const plan = { initiatorName: 'iqn.h:1', targetName: target, to: 'p3', untilMs: 10_000 };
  p1.plan(plan);
  p3.plan(plan);
  // libiscsi comes back to its original portal with a NEW ISID.
  const d = p1.onLogin(view, login('new-isid'), 50);
  t.same(d.kind === 'redirect' && [d.to.peerId, d.reason], ['p3', 'planned']);
  t.same(p3.onLogin(view, login('new-isid'), 60), { kind: 'accept', reason: 'planned-here' });
  t.same(p1.onLogin(view, login('later'), 70), { kind: 'accept', reason: 'best' }, 'the plan was used up');
  p1.plan({ ...plan, untilMs: 100 });
  t.same(p1.onLogin(view, login('late'), 101), { kind: 'accept', reason: 'best' }, 'an expired plan does nothing');
  p1.plan(plan);
  p1.cancelPlan(plan.initiatorName, plan.targetName);
  t.same(p1.onLogin(view, login('x'), 200), { kind: 'accept', reason: 'best' }, 'a cancelled plan does nothing');
  p1.plan(plan);
  t.equal(p1.onLogin([peer('p1', 0), peer('p2', 0), peer('p3', 0, { up: false })], login('y'), 300).kind, 'accept', 'never sent to a peer that is down');
  // The host left p2 for p3 and comes back to p1 before the gossip drops its session on p2.
  p1.plan(plan);
  const stale = p1.onLogin(view, { ...login('z'), multipath: true, otherPaths: ['p2'] }, 400);
  t.same(stale.kind === 'redirect' && [stale.to.peerId, stale.reason], ['p3', 'planned'], 'the session it just left (still gossiped) does not keep it off its destination');
  p1.plan(plan);
  t.same(p1.onLogin(view, { ...login('w'), multipath: true, otherPaths: ['p3'] }, 500), { kind: 'accept', reason: 'multipath' }, 'a path it already has on the destination does: never two paths on one peer');
});

t.test('automatic moves: margin, minimum age, cool-down, rate limit, reservations', async (t) => {
  const b = new HostBalancer('p1', { ...s, sessionMinAgeMs: 1_000, moveIntervalMs: 5_000, sessionCooldownMs: 20_000 });
  const sess = (tsih: number, startedAtMs: number, pinned = false): MovableSession => ({ tsih, initiatorName: `iqn.h:${tsih}`, isid: 'aa', targetName: target, startedAtMs, pinned, multipath: false });
  const loaded = [peer('p1', 3), peer('p2', 1), peer('p3', 2)];
  t.equal(b.pickMove([peer('p1', 2), peer('p2', 1)], [sess(1, 0), sess(2, 0)], 10_000), undefined, 'one session apart: moving would only swap the imbalance');
  t.equal(b.pickMove(loaded, [sess(1, 9_500), sess(2, 9_600), sess(3, 9_700)], 10_000), undefined, 'all too young');
  t.equal(b.pickMove(loaded, [sess(1, 0, true), sess(2, 0, true), sess(3, 0, true)], 10_000), undefined, 'all pinned by reservations');
  const pick = b.pickMove(loaded, [sess(1, 0), sess(2, 100), sess(3, 50, true)], 10_000);
  t.same(pick && [pick.session.tsih, pick.to.peerId], [2, 'p2'], 'the newest unpinned session, to the least loaded peer');
  b.noteAsked(2, 10_000);
  t.equal(b.pickMove(loaded, [sess(1, 0), sess(2, 100)], 12_000), undefined, 'rate limit: one move per interval');
  t.equal(b.pickMove(loaded, [sess(2, 100)], 16_000), undefined, 'a session asked recently is not asked again');
  t.equal(b.pickMove(loaded, [sess(1, 0), sess(2, 100)], 16_000)?.session.tsih, 1, 'another one may go after the interval');
  const off = new HostBalancer('p1', { ...s, autoMove: false, sessionMinAgeMs: 0 });
  t.equal(off.pickMove(loaded, [sess(1, 0)], 100_000), undefined, 'autoMove off: never');
});

t.test('the login machine asks the hook with the ISID and answers 0x0101 with the destination\'s portal group', async (t) => {
  const info: TargetInfo = { name: target, allow: [], luns: new Map() };
  const directory: TargetDirectory = { portalGroupTag: 1, portalAddresses: ['127.0.0.1:3261'], find: (n) => (n === target ? info : undefined), visibleTo: () => [info] };
  const asked: string[][] = [];
  const ctx = (answer: string | undefined): LoginContext => ({
    directory, targetParams: defaultTargetPrefs(), randomBytes: (n) => Buffer.alloc(n, 1), allocateTsih: () => 1, sessionExists: () => false,
    redirectFor: (i, tn, isid) => {
      asked.push([i, tn, isid]);
      return answer;
    },
  });
  const req = (keys: Record<string, string>): LoginRequestPdu => ({
    opcode: Op.loginRequest, immediate: true, final: true, transit: true, continue: false, csg: 0, nsg: 1, versionMax: 0, versionMin: 0,
    isid: Buffer.from('400001370000', 'hex'), tsih: 0, initiatorTaskTag: 1, cid: 0, cmdSN: 1, expStatSN: 0, data: encodeTextKeys(Object.entries(keys)),
  });
  const step = new LoginMachine(ctx('127.0.0.1:3263,3')).step(req({ InitiatorName: 'iqn.h:1', TargetName: target, AuthMethod: 'None' }));
  t.equal(step.response.status, LoginStatus.targetMovedTemporarily);
  t.equal(new Map(parseTextKeys(step.response.data)).get('TargetAddress'), '127.0.0.1:3263,3');
  t.ok(step.close);
  t.same(asked, [['iqn.h:1', target, '400001370000']]);
  const disc = new LoginMachine(ctx('127.0.0.1:3263,3')).step(req({ InitiatorName: 'iqn.h:1', SessionType: 'Discovery', AuthMethod: 'None' }));
  t.equal(disc.response.status, LoginStatus.success, 'a discovery session is never redirected');
  t.equal(asked.length, 1, 'and the hook is not even asked');
  const stay = new LoginMachine(ctx(undefined)).step(req({ InitiatorName: 'iqn.h:1', TargetName: target, AuthMethod: 'None' }));
  t.equal(stay.response.status, LoginStatus.success);
});

t.test('Logout with a write still waiting for Data-Out: answered at once; a command inside the LU finishes first', async (t) => {
  const pending: Array<(r: ScsiResult) => void> = [];
  const lu: LogicalUnit = { lun: 0, execute: () => new Promise((r) => pending.push(r)), reset: () => undefined, nexusLost: () => undefined };
  const info: TargetInfo = { name: target, allow: [], luns: new Map([[0, lu]]) };
  const directory: TargetDirectory = { portalGroupTag: 1, portalAddresses: [], find: () => info, visibleTo: () => [info] };
  const out: TargetPdu[] = [];
  const closed: string[] = [];
  const session = new Session({
    sessionType: 'Normal', initiatorName: 'iqn.h:1', target: info, directory,
    params: { ...defaultSessionParams(), immediateData: false, initialR2T: true, maxRecvDataSegmentLength: 65536, maxXmitDataSegmentLength: 8192 },
    expCmdSN: 1, statSN: 100, nexus: { initiatorPort: 'i', initiatorName: 'iqn.h:1', targetPort: 't', relativeTargetPort: 1 },
    io: { send: (p) => out.push(p), close: (r) => closed.push(r) }, log: pino({ level: 'silent' }), nowMs: 0,
    budget: new ByteBudget(peerTaskBytesMax),
  });
  const cmd = (itt: number, cmdSN: number, write: boolean): InitiatorPdu => ({
    opcode: Op.scsiCommand, immediate: false, final: true, initiatorTaskTag: itt, data: Buffer.alloc(0), read: !write, write, taskAttr: 1,
    lun: Buffer.alloc(8), expectedDataTransferLength: 4096, cmdSN, expStatSN: 100, cdb: Buffer.from(write ? '2a000000000000000800' : '28000000000000000800', 'hex'),
  });
  session.onPdu(cmd(1, 1, false), 0); // a read: reaches the LU
  session.onPdu(cmd(2, 2, true), 0); // a write: R2T sent, the data never comes (the initiator corked after Logout)
  session.onPdu(cmd(4, 4, false), 0); // behind a CmdSN gap: never delivered
  t.ok(out.some((p) => p.opcode === Op.r2t), 'R2T for the write');
  session.onPdu({ opcode: Op.logoutRequest, immediate: true, final: true, initiatorTaskTag: 9, data: Buffer.alloc(0), reasonCode: 0, cid: 0, cmdSN: 5, expStatSN: 100 }, 0);
  await new Promise((r) => setImmediate(r));
  t.notOk(out.some((p) => p.opcode === Op.logoutResponse), 'waits for the read inside the LU');
  pending[0]({ status: ScsiStatus.good, dataIn: Buffer.alloc(4096) });
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
  const kinds = out.map((p) => p.opcode);
  t.ok(kinds.includes(Op.logoutResponse), 'then answers the Logout without waiting for the write\'s data');
  t.ok(kinds.lastIndexOf(Op.dataIn) < kinds.indexOf(Op.logoutResponse), 'the read\'s data and status went first');
  t.notOk(out.some((p) => p.opcode === Op.scsiResponse && [2, 4].includes(p.initiatorTaskTag)), 'the unfinished commands end unanswered (the initiator re-issues them)');
  t.equal(pending.length, 1, 'the write never reached the LU');
  t.same(closed, ['logout']);
});

t.test('cluster.yaml hostBalance', async (t) => {
  const base = 'cluster: { name: c, adminToken: a, secret: s, HB }\npeers:\n  - { id: p1, iscsi: "127.0.0.1:1", rpc: "127.0.0.1:2", http: "127.0.0.1:3", data: /tmp/x }\n';
  t.equal(parseConfig(base.replace(', HB', '')).hostBalance, undefined, 'absent: defaults');
  t.same(parseConfig(base.replace('HB', 'hostBalance: { enabled: false }')).hostBalance, { enabled: false });
  t.same(parseConfig(base.replace('HB', 'hostBalance: { autoMove: false, logoutSeconds: 3, marginSessions: 2 }')).hostBalance, { autoMove: false, logoutSeconds: 3, marginSessions: 2 });
  t.throws(() => parseConfig(base.replace('HB', 'hostBalance: { enabled: yes-please }')), /hostBalance.enabled must be true or false/);
  t.throws(() => parseConfig(base.replace('HB', 'hostBalance: { logoutSeconds: 0 }')), /logoutSeconds/);
  t.throws(() => parseConfig(base.replace('HB', 'hostBalance: 3')), /must be a mapping/);
});
