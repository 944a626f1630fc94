// The admin operations in their concepts' modules, with no sockets: a real catalog (embedded),
// and the rest of the peer (targets, migrator, the other peers' PeerService) as recording fakes.
// What is checked is where each operation goes (this peer or the page's owner), and what an
// operator is told when a peer does not answer or hosts are logged in.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import t from 'tap';
import { Catalog } from '../src/cluster/catalog';
import { EmbeddedMetaStore } from '../src/cluster/embedded';
import { groupStatus, type PeerStatusView } from '../src/cluster/group-status';
import { volumeAdmin } from '../src/cluster/volume-admin';
import { ManualEnv } from '../src/env/manual';
import type { SessionInfo } from '../src/iscsi/portal';
import { moveAdmin } from '../src/migration/admin';
import type { MoveInfo } from '../src/migration/migrator';
import { sessionAdmin } from '../src/server/host-balance-wiring';
import type { HostBalanceService } from '../src/server/host-balance-service';
import { fixedMembers } from '../src/cluster/members';

const peers = ['p1', 'p2', 'p3'].map((id, i) => ({ id, iscsi: `10.0.0.${i + 1}:3260`, rpc: `10.0.0.${i + 1}:7000`, http: `10.0.0.${i + 1}:8000` }));
const log = pino({ level: 'silent' });

function session(tsih: number, targetName: string): SessionInfo {
  return { tsih, initiatorName: 'iqn.2026-11.test:host', isid: '000000000001', targetName, sessionType: 'Normal', remoteAddress: '10.0.1.1', commandsInFlight: 0 };
}

function statusOf(id: string, sessions: SessionInfo[]): PeerStatusView {
  const p = peers.find((x) => x.id === id)!;
  return { ...p, up: true, uptimeMs: 1, allocatedBytes: 0, freeBytes: 0, totalBytes: 0, volumes: 1, sessions, version: 'test' };
}

/** p1's view of the group: p2 answers with `p2Sessions`, p3 is down. */
function group(p1Sessions: SessionInfo[], p2Sessions: SessionInfo[]) {
  return groupStatus({
    cluster: 'test', self: 'p1', peers: () => peers,
    selfStatus: async () => statusOf('p1', p1Sessions),
    calls: (id) => ({ status: async () => (id === 'p2' ? statusOf('p2', p2Sessions) : Promise.reject(new Error('connection refused'))) }),
  });
}

t.test('a peer that does not answer is shown down, not an error', async (t) => {
  const s = await group([], []).status();
  t.same(s.peers.map((p) => `${p.id}:${p.up}`), ['p1:true', 'p2:true', 'p3:false']);
  t.equal(s.peers[2].rpc, peers[2].rpc, 'with its addresses from cluster.yaml');
});

t.test('volumes, moves and sessions', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-admin-ops-'));
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const catalog = await Catalog.open(meta, { members: fixedMembers(peers.map((p) => p.id)), pageBlocks: 8192, env: new ManualEnv() });
  t.teardown(async () => {
    catalog.close();
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const applied: string[] = [];
  const target = 'iqn.2026-11.io.peersan:vol';
  const volumes = volumeAdmin({
    catalog, log, group: group([], [session(7, target)]), localSessions: () => [session(3, target)],
    targets: { apply: async (name, record) => void applied.push(`${name}:${record ? 'open' : 'closed'}`), allocatedBytes: () => 4096 },
  });

  await t.test('a volume is open on this peer before "created", and its view counts this peer\'s sessions', async (t) => {
    const v = await volumes.createVolume({ name: 'vol', size: '48M' });
    t.same(applied, ['vol:open']);
    t.match(v, { name: 'vol', sizeBytes: 48 * 2 ** 20, targetName: target, sessions: 1, allocatedBytes: 4096, peers: ['p1', 'p2', 'p3'] });
    await t.rejects(volumes.getVolume('nope'), { code: 'PEERSAN_ERR_NOT_FOUND' });
  });

  await t.test('delete is refused while a host is logged in anywhere that answers, unless forced', async (t) => {
    await t.rejects(volumes.deleteVolume('vol', false), /volume vol has 1 session\(s\) logged in \(through p2\); log them out first or use --force/);
    t.same(applied, ['vol:open'], 'nothing closed');
  });

  await t.test('a move goes to the page\'s owner: run here, or asked over PeerService', async (t) => {
    const map = await volumes.pageMap('vol');
    const mine = map.pages.find((p) => p.owner === 'p1')!.page;
    const theirs = map.pages.find((p) => p.owner === 'p2')!;
    const calls: string[] = [];
    const info = (page: number, from: string) => ({ volumeId: 'v', volume: 'vol', page, from, to: 'p3' }) as unknown as MoveInfo;
    const moves = moveAdmin({
      self: 'p1', groupPeers: () => peers.map((p) => p.id), catalog,
      migrator: { start: async (_v, page) => (calls.push(`local start ${page}`), info(page, 'p1')), cancel: (_id, page) => void calls.push(`local cancel ${page}`), list: () => [info(mine, 'p1')] },
      calls: (id) => ({
        startMove: async (_v, page) => (calls.push(`${id} start ${page}`), info(page, id)),
        cancelMove: async (_v, page) => void calls.push(`${id} cancel ${page}`),
        moves: async () => (id === 'p2' ? [info(theirs.page, 'p2')] : Promise.reject(new Error('timed out'))),
      }),
    });
    await moves.movePage('vol', mine, 'p3');
    await moves.movePage('vol', theirs.page, 'p3');
    await moves.cancelMove('vol', theirs.page);
    await moves.cancelMove('vol', mine);
    t.same(calls, [`local start ${mine}`, `p2 start ${theirs.page}`, `p2 cancel ${theirs.page}`, `local cancel ${mine}`]);
    const all = await moves.migrations();
    t.same(all.moves.map((m) => m.from), ['p1', 'p2']);
    t.same(all.unreachable, ['p3'], 'a peer that does not answer is named');
  });

  await t.test('a TSIH logged in on several peers: the operator is asked which', async (t) => {
    const hostBalance = { move: async () => [] } as unknown as HostBalanceService;
    const sessions = sessionAdmin({ self: 'p1', groupPeers: () => peers.map((p) => p.id), hostBalance, group: group([session(7, target)], [session(7, target)]), calls: () => ({ moveSession: async () => [] }) });
    await t.rejects(sessions.moveSession('7', 'p3', ''), /TSIH 7 is logged in on p1, p2: say which with --on PEER/);
    await t.rejects(sessions.moveSession('7', 'p3', 'p9'), /no peer p9 in this group/);
    const off = sessionAdmin({ self: 'p1', groupPeers: () => ['p1'], hostBalance: undefined, group: group([], []), calls: () => ({ moveSession: async () => [] }) });
    await t.rejects(off.moveSession('7', 'p3', ''), /host balancing is off on this peer/);
  });

  await t.test('forced, the volume goes from the catalog and its target closes here', async (t) => {
    await volumes.deleteVolume('vol', true);
    t.same(applied, ['vol:open', 'vol:closed']);
    t.same(await volumes.listVolumes(), []);
  });
});
