// Multipath (issue 17): implicit ALUA with one target port group per peer, SendTargets listing
// every up peer's portal, the unit attention on a state change, and host balancing leaving
// multipath hosts alone. Golden bytes for the SCSI data (SPC-4 6.6.2, 7.8.6.5-6, 6.36); the
// states read from the gossip view (PortGroups); the whole wiring in an in-process group of two
// peers, one of which stops and comes back.

import t from 'tap';
import pino from 'pino';
import { setTimeout as delay } from 'node:timers/promises';
import { ManualEnv } from '../src/env/manual';
import { sendTargetsAnswer } from '../src/iscsi/discovery';
import type { Portal, SessionInfo } from '../src/iscsi/portal';
import { targetNameFor, type TargetDirectory, type TargetInfo, type TargetPortal } from '../src/iscsi/target';
import { loadStaleMs } from '../src/limits';
import { AluaState, reportTargetPortGroupsData, type TargetPortGroup } from '../src/scsi/alua';
import { BlockLogicalUnit } from '../src/scsi/device';
import { ScsiStatus, type LogicalUnit, type Nexus, type ScsiResult } from '../src/scsi/types';
import { defaultHostBalanceSettings, HostBalancer, otherPaths, type LoginAttempt, type MovableSession, type PeerLoad, type ReportedSession } from '../src/server/host-balance';
import { HostBalanceService } from '../src/server/host-balance-service';
import { PortGroups } from '../src/server/port-groups';
import { aluaUnavailableMs } from '../src/limits';
import { startGroup } from './helpers/group';
import { MemoryBackend } from './helpers/memory-backend';
import { fixedMembers, type MembersView, type MemberState } from '../src/cluster/members';

const nexus1: Nexus = { initiatorPort: 'iqn.h:1,i,0x1', initiatorName: 'iqn.h:1', targetPort: 'iqn.t,t,0x0002', relativeTargetPort: 2 };
const nexus2: Nexus = { initiatorPort: 'iqn.h:2,i,0x2', initiatorName: 'iqn.h:2', targetPort: 'iqn.t,t,0x0002', relativeTargetPort: 2 };

function lu(portGroups?: () => readonly TargetPortGroup[]): BlockLogicalUnit {
  return new BlockLogicalUnit({
    lun: 0, backend: new MemoryBackend(), targetName: 'iqn.2026-11.io.peersan:v',
    identity: { volumeId: '0123456789abcdef', volumeName: 'v', vendor: 'PEERSAN', product: 'peersan volume', revision: '0.2', readOnly: false },
    ...(portGroups ? { portGroups } : {}),
  });
}

function run(unit: LogicalUnit, cdbHex: string, nexus = nexus1): Promise<ScsiResult> {
  return unit.execute({ cdb: Buffer.from(cdbHex.replace(/ /g, ''), 'hex'), lun: 0, nexus, taskAttr: 1, expectedDataLength: 4096, dataOut: null });
}

/** Sense key and ASC/ASCQ of a CHECK CONDITION in fixed format, as "k/asc/ascq". */
const senseOf = (r: ScsiResult): string => r.status === ScsiStatus.checkCondition ? [r.sense![2] & 0x0f, r.sense![12], r.sense![13]].map((x) => x.toString(16).padStart(2, '0')).join('/') : 'good';

const rtpg = 'a3 0a 00 00 00 00 00 00 10 00 00 00';
const rtpgExtended = 'a3 2a 00 00 00 00 00 00 10 00 00 00';

const threePeers: TargetPortGroup[] = [
  { id: 1, state: AluaState.activeOptimized, relativePorts: [1] },
  { id: 2, state: AluaState.activeOptimized, relativePorts: [2] },
  { id: 3, state: AluaState.unavailable, relativePorts: [3] },
];
/** p2 draining. */
const mixedPeers: TargetPortGroup[] = threePeers.map((g) => (g.id === 2 ? { ...g, state: AluaState.activeNonOptimized } : g));

t.test('INQUIRY says implicit ALUA; VPD 0x83 names the relative target port and its group', async (t) => {
  const u = lu();
  const std = await run(u, '12 00 00 00 ff 00');
  t.equal(std.dataIn![5], 0x18, 'byte 5: TPGS 01b (implicit ALUA) and 3PC');
  t.equal((std.dataIn![5] >> 4) & 0x03, 1, 'TPGS = 01b');
  const page = (await run(u, '12 01 83 00 ff 00')).dataIn!;
  const hex = page.toString('hex');
  // Relative target port (type 4) and target port group (type 5): iSCSI, binary, PIV, target port association.
  t.ok(hex.includes('5194000400000002'), 'relative target port designator: port 2');
  t.ok(hex.includes('5195000400000002'), 'target port group designator: group 2');
});

t.test('REPORT TARGET PORT GROUPS: golden bytes, both formats, allocation length, bad format', async (t) => {
  const golden = Buffer.from([
    0x00, 0x00, 0x00, 0x24, // return data length: 3 descriptors of 12 bytes
    0x00, 0x0b, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, // group 1, active/optimized, AO_SUP|AN_SUP|U_SUP, one port: 1
    0x01, 0x0b, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, // group 2 active/non-optimized (draining)
    0x03, 0x0b, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x03, // group 3 unavailable
  ]);
  t.same(reportTargetPortGroupsData(mixedPeers, 0), golden, 'length-only header');
  const u = lu(() => mixedPeers);
  const r = await run(u, rtpg);
  t.equal(r.status, ScsiStatus.good);
  t.same(r.dataIn, golden, 'what the logical unit answers');
  const ext = await run(u, rtpgExtended);
  t.same(ext.dataIn!.subarray(0, 8), Buffer.from([0x00, 0x00, 0x00, 0x28, 0x10, 0x00, 0x00, 0x00]), 'extended header: format type 001b, length counts its 4 more bytes');
  t.same(ext.dataIn!.subarray(8), golden.subarray(4), 'then the same descriptors');
  const short = await run(u, 'a3 0a 00 00 00 00 00 00 00 06 00 00');
  t.same(short.dataIn, golden.subarray(0, 6), 'cut to the allocation length');
  t.equal(senseOf(await run(u, 'a3 4a 00 00 00 00 00 00 10 00 00 00')), '05/24/00', 'parameter data format 010b: INVALID FIELD IN CDB');
  const alone = await run(lu(), rtpg);
  t.same(alone.dataIn, Buffer.from('0000000c' + '000b0002 00000001 00000002'.replace(/ /g, ''), 'hex'), 'no groups given: its own port, active/optimized');
});

t.test('REPORT SUPPORTED OPERATION CODES lists REPORT TARGET PORT GROUPS', async (t) => {
  const u = lu();
  const one = await run(u, 'a3 0c 02 a3 00 0a 00 00 01 00 00 00');
  t.equal(one.dataIn![1] & 0x07, 0x03, 'supported, as the standard says');
  t.same(one.dataIn!.subarray(4, 6), Buffer.from([0xa3, 0x0a]), 'its CDB usage begins with the opcode and service action');
  const all = (await run(u, 'a3 0c 00 00 00 00 00 00 10 00 00 00')).dataIn!;
  const listed: string[] = [];
  for (let off = 4; off < 4 + all.readUInt32BE(0); off += 8) listed.push(`${all[off].toString(16)}/${all.readUInt16BE(off + 2).toString(16)}`);
  t.ok(listed.includes('a3/a'), 'in the list of every command');
});

t.test('a state change raises ASYMMETRIC ACCESS STATE CHANGED once on every nexus', async (t) => {
  const u = lu(() => threePeers);
  t.equal(senseOf(await run(u, '00 00 00 00 00 00', nexus1)), 'good');
  t.equal(senseOf(await run(u, '00 00 00 00 00 00', nexus2)), 'good');
  u.accessStatesChanged();
  t.equal(senseOf(await run(u, '12 00 00 00 ff 00', nexus1)), 'good', 'INQUIRY does not take it');
  t.equal(senseOf(await run(u, '00 00 00 00 00 00', nexus1)), '06/2a/06', 'nexus 1 hears it');
  t.equal(senseOf(await run(u, '00 00 00 00 00 00', nexus1)), 'good', 'once');
  t.equal(senseOf(await run(u, rtpg, nexus2)), '06/2a/06', 'nexus 2 hears it too, on its next command');
  t.equal(senseOf(await run(u, rtpg, nexus2)), 'good', 'and then reads the states');
});

t.test('PortGroups: up from the gossip view, a change told once, SendTargets lists the up peers', async (t) => {
  const stale = new Map([['p1', false], ['p2', false], ['p3', true]]);
  // How long since each peer was last heard (-1: never).
  const ages = new Map([['p1', 0], ['p2', 0], ['p3', -1]]);
  let changes = 0;
  const groups = new PortGroups({
    self: 'p1', members: fixedMembers(['p1', 'p2', 'p3'], (id) => ({ iscsi: `10.0.0.${id.slice(1)}:3260` })),
    loads: () => [...stale].map(([id, s]) => ({ id, stale: s, ageMs: ages.get(id)! })),
  });
  groups.onChange(() => changes++);
  t.same(groups.groups(), threePeers, 'p3 not heard from: unavailable');
  t.same(groups.otherPortals(), [{ address: '10.0.0.2:3260', groupTag: 2 }], 'the other up peer (not this one, not p3)');
  groups.refresh();
  t.equal(changes, 0, 'nothing changed: nobody told');
  stale.set('p3', false);
  stale.set('p1', true); // this peer's own summary is late: it is up anyway, it is answering
  groups.refresh();
  t.equal(changes, 1, 'p3 came back: told once');
  t.same(groups.groups().map((g) => g.state), [AluaState.activeOptimized, AluaState.activeOptimized, AluaState.activeOptimized]);
  t.same(groups.otherPortals().map((p) => p.groupTag), [2, 3]);
  groups.refresh();
  t.equal(changes, 1, 'no second word for the same states');
  stale.set('p2', true);
  ages.set('p2', aluaUnavailableMs - 1);
  groups.refresh();
  t.equal(changes, 1, 'p2 late (stale gossip) but not yet silent for aluaUnavailableMs: still active, no unit attention');
  ages.set('p2', aluaUnavailableMs + 1);
  groups.refresh();
  t.equal(changes, 2, 'p2 went quiet: told');
  t.equal(groups.groups()[1].state, AluaState.unavailable);
});

t.test('PortGroups: a draining or leaving peer is active/non-optimized while heard, and not offered by SendTargets', async (t) => {
  const base = fixedMembers(['p1', 'p2', 'p3'], (id) => ({ iscsi: `10.0.0.${id.slice(1)}:3260` }));
  const states = new Map<string, MemberState>([['p1', 'up'], ['p2', 'up'], ['p3', 'up']]);
  const members: MembersView = { ids: base.ids, placeable: base.placeable, get: (id) => ({ ...base.get(id)!, state: states.get(id)! }) };
  const heard = new Map([['p1', true], ['p2', true], ['p3', true]]);
  let changes = 0;
  const groups = new PortGroups({ self: 'p1', members, loads: () => [...heard].map(([id, h]) => ({ id, stale: !h, ageMs: h ? 0 : aluaUnavailableMs + 1 })) });
  groups.onChange(() => changes++);
  t.same(groups.groups().map((g) => g.state), [AluaState.activeOptimized, AluaState.activeOptimized, AluaState.activeOptimized]);
  states.set('p2', 'draining');
  groups.refresh();
  t.equal(changes, 1, 'the drain is a change (the unit attention)');
  t.same(groups.groups().map((g) => g.state), [AluaState.activeOptimized, AluaState.activeNonOptimized, AluaState.activeOptimized], 'draining: active/non-optimized, I/O still served');
  t.same(groups.otherPortals().map((p) => p.groupTag), [3], 'SendTargets offers p3 only');
  states.set('p2', 'leaving');
  groups.refresh();
  t.equal(changes, 1, 'draining to leaving: the same state, no second unit attention');
  heard.set('p2', false);
  groups.refresh();
  t.equal(groups.groups()[1].state, AluaState.unavailable, 'gone quiet: unavailable');
  states.set('p1', 'draining');
  groups.refresh();
  t.equal(groups.groups()[0].state, AluaState.activeNonOptimized, 'this peer draining reports itself non-optimized too');
});

t.test('PortGroups: peers starting together are not reported down before they could speak', async (t) => {
  let nowMs = 0;
  const groups = new PortGroups({
    self: 'p1', members: fixedMembers(['p1', 'p2']),
    loads: () => [{ id: 'p1', stale: false, ageMs: 0 }, { id: 'p2', stale: true, ageMs: -1 }],
    nowMs: () => nowMs,
  });
  t.equal(groups.groups()[1].state, AluaState.activeOptimized, 'p2 not heard yet, at start: active');
  nowMs = aluaUnavailableMs + 1;
  groups.refresh();
  t.equal(groups.groups()[1].state, AluaState.unavailable, 'still never heard after the grace: unavailable');
});

t.test('SendTargets: one TargetAddress per up peer, each with its own portal group tag', async (t) => {
  const info: TargetInfo = { name: 'iqn.2026-11.io.peersan:vol', allow: [], luns: new Map() };
  let others: TargetPortal[] = [{ address: '10.0.0.1:3260', groupTag: 1 }, { address: '10.0.0.3:3260', groupTag: 3 }];
  const directory: TargetDirectory = { portalGroupTag: 2, portalAddresses: ['10.0.0.2:3260'], otherPortals: () => others, find: () => info, visibleTo: () => [info] };
  const expect = [['TargetName', info.name], ['TargetAddress', '10.0.0.2:3260,2'], ['TargetAddress', '10.0.0.1:3260,1'], ['TargetAddress', '10.0.0.3:3260,3']];
  t.same(sendTargetsAnswer(directory, 'iqn.h:1', 'All', undefined), expect, 'discovery session: ours first, then the others');
  t.same(sendTargetsAnswer(directory, 'iqn.h:1', '', info), expect, 'a normal session asking about its own target: the same');
  others = [];
  t.same(sendTargetsAnswer(directory, 'iqn.h:1', 'All', undefined), expect.slice(0, 2), 'the others down: ours alone');
});

t.test('host balancing leaves a multipath host alone', async (t) => {
  const target = 'iqn.2026-11.io.peersan:vol';
  const sessions: ReportedSession[] = [
    { peer: 'p2', initiatorPort: 'iqn.h:1,i,0x40000001', targetName: target, ended: false },
    { peer: 'p3', initiatorPort: 'iqn.h:1,i,0x40000002', targetName: target, ended: true },
    { peer: 'p3', initiatorPort: 'iqn.h:10,i,0x40000003', targetName: target, ended: false },
    { peer: 'p3', initiatorPort: 'iqn.h:1,i,0x40000004', targetName: 'iqn.2026-11.io.peersan:other', ended: false },
    { peer: 'p1', initiatorPort: 'iqn.h:1,i,0x40000005', targetName: target, ended: false },
  ];
  t.same(otherPaths(sessions, 'p1', 'iqn.h:1', target), ['p2'], 'live sessions of that initiator to that target through other peers only');
  t.same(otherPaths(sessions, 'p2', 'iqn.h:1', target), ['p1'], 'seen from p2');
  t.same(otherPaths(sessions, 'p1', 'iqn.h:10', target), ['p3'], 'a name that begins like another is another');
  t.same(otherPaths(sessions, 'p1', 'iqn.h:2', target), [], 'a host with no other path');

  const peer = (id: string, n: number): PeerLoad => ({ peerId: id, iscsiAddress: `10.0.0.${id.slice(1)}:3260`, portalGroupTag: Number(id.slice(1)), up: true, sessions: n, iops: 0, bytesPerSec: 0 });
  const busy = [peer('p1', 6), peer('p2', 0), peer('p3', 0)];
  const login = (isid: string, multipath: boolean): LoginAttempt => ({ initiatorName: 'iqn.h:1', isid, targetName: target, sessionType: 'Normal', multipath });
  const b = new HostBalancer('p1', { ...defaultHostBalanceSettings });
  t.equal(b.onLogin(busy, login('a', false), 0).kind, 'redirect', 'a single-path host is sent to a less busy peer');
  t.same(b.onLogin(busy, login('b', true), 0), { kind: 'accept', reason: 'multipath' }, 'a multipath host is not');
  b.plan({ initiatorName: 'iqn.h:1', targetName: target, to: 'p3', untilMs: 10_000 });
  t.same(b.onLogin(busy, { ...login('c', true), otherPaths: ['p3'] }, 100), { kind: 'accept', reason: 'multipath' }, 'nor by a planned move to a peer it already has a path through');
  b.plan({ initiatorName: 'iqn.h:1', targetName: target, to: 'p3', untilMs: 10_000 });
  t.equal(b.onLogin(busy, { ...login('d', true), otherPaths: ['p2'] }, 200).kind, 'redirect', 'a planned move elsewhere goes ahead (the path the gossip still lists is the session the move just ended)');

  const auto = new HostBalancer('p1', { ...defaultHostBalanceSettings, sessionMinAgeMs: 0 });
  const session = (tsih: number, multipath: boolean): MovableSession => ({ tsih, initiatorName: `iqn.h:${tsih}`, isid: 'aa', targetName: target, startedAtMs: 0, pinned: false, multipath });
  t.equal(auto.pickMove(busy, [session(1, true), session(2, true)], 100_000), undefined, 'an overloaded peer moves no path of a multipath host');
  t.equal(auto.pickMove(busy, [session(1, true), session(2, false)], 100_000)?.session.tsih, 2, 'it moves a single-path host instead');
});

t.test('the host balancing service asks who else the host reaches the target through', async (t) => {
  const target = 'iqn.2026-11.io.peersan:vol';
  const env = new ManualEnv({ wallOriginMs: 1e12 });
  const session = (tsih: number, initiatorName: string): SessionInfo => ({ tsih, initiatorName, isid: `40000000000${tsih}`, targetName: target, sessionType: 'Normal', remoteAddress: '10.0.1.1', commandsInFlight: 0 });
  const live = [session(1, 'iqn.multi:1'), session(2, 'iqn.single:2')];
  const asked: number[] = [];
  const portal = { sessions: () => live, requestLogoutOf: (tsih: number) => (asked.push(tsih), true) } as unknown as Portal;
  const loads: PeerLoad[] = ['p1', 'p2', 'p3'].map((id) => ({ peerId: id, iscsiAddress: `10.0.0.${id.slice(1)}:3260`, portalGroupTag: Number(id.slice(1)), up: true, sessions: id === 'p1' ? 6 : 0, iops: 0, bytesPerSec: 0 }));
  const hb = new HostBalanceService({
    selfId: 'p1', env, log: pino({ level: 'silent' }), portal: () => portal, view: { peers: () => loads },
    settings: { sessionMinAgeMs: 0 }, pinned: () => false, broadcastPlan: async () => undefined,
    reportedSessions: () => [{ peer: 'p2', initiatorPort: 'iqn.multi:1,i,0x400000000007', targetName: target, ended: false }],
  });
  t.equal(hb.redirectFor('iqn.multi:1', target, '400000000009'), undefined, 'a login of the multipath host stays');
  t.equal(hb.redirectFor('iqn.single:3', target, '40000000000a'), '10.0.0.2:3260,2', 'a single-path host is sent on');
  await t.rejects(hb.move('iqn.multi:1', 'p3'), /multipath host of .*through p2/, 'the admin move refuses a path of a multipath host');
  t.same(asked, [], 'and asks nothing of it');
  const moved = await hb.check();
  t.equal(moved?.tsih, 2, 'the overload check moves the single-path host');
  t.same(asked, [2], 'only that one was asked to log out');
});

t.test('in a group: the states follow the peers, a change raises the unit attention, SendTargets follows', async (t) => {
  const g = await startGroup(t, 2, { hostBalance: { enabled: false } });
  const p1 = g.peer('p1');
  await p1.admin.createVolume({ name: 'vol', size: '64M' });
  const target = targetNameFor('vol');
  const nexus: Nexus = { initiatorPort: 'iqn.h:1,i,0x1', initiatorName: 'iqn.h:1', targetPort: `${target},t,0x0001`, relativeTargetPort: 1 };
  const unit = (): LogicalUnit => p1.core.targets.find(target)!.luns.get(0)!;
  const addresses = (): string[] => sendTargetsAnswer(p1.core.targets, 'iqn.h:1', 'All', undefined).filter(([k]) => k === 'TargetAddress').map(([, v]) => v);
  const states = async (): Promise<number[]> => {
    const r = await run(unit(), rtpg, nexus);
    return r.status === ScsiStatus.good ? [r.dataIn![4] & 0x0f, r.dataIn![16] & 0x0f] : [-1];
  };
  const until = async (ok: () => boolean, ms: number): Promise<void> => {
    for (const end = Date.now() + ms; !ok() && Date.now() < end;) await delay(100);
  };
  const portal = (id: string): string => g.config.peers.find((p) => p.id === id)!.iscsi;
  await until(() => addresses().length === 2, 15_000);
  t.same(addresses(), [`${portal('p1')},1`, `${portal('p2')},2`], 'p2 is heard from: both portals listed');
  t.same(await states(), [AluaState.activeOptimized, AluaState.activeOptimized], 'both groups active/optimized');
  t.equal(senseOf(await run(unit(), '00 00 00 00 00 00', nexus)), 'good', 'the nexus is known to the logical unit');

  await g.peer('p2').stop();
  // A graceful stop marks p2 leaving, which SendTargets follows at once; the record set back to
  // up leaves p2 silent as after a crash: the states follow the gossip.
  await p1.members.setState('p2', 'up', 'test');
  await until(() => addresses().length === 1, loadStaleMs + 15_000);
  t.same(addresses(), [`${portal('p1')},1`], 'p2 stopped: only p1 listed');
  t.equal(senseOf(await run(unit(), '00 00 00 00 00 00', nexus)), '06/2a/06', 'ASYMMETRIC ACCESS STATE CHANGED');
  t.same(await states(), [AluaState.activeOptimized, AluaState.unavailable], 'p2 unavailable');

  await g.start('p2');
  await until(() => addresses().length === 2, 15_000);
  t.same(addresses(), [`${portal('p1')},1`, `${portal('p2')},2`], 'p2 back: listed again');
  t.equal(senseOf(await run(unit(), '00 00 00 00 00 00', nexus)), '06/2a/06', 'and the unit attention again');
  t.same(await states(), [AluaState.activeOptimized, AluaState.activeOptimized]);
});
