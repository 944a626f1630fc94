// `peersan peer drain | undrain | remove | stop` against real peer processes: human output and
// --json, one clear line and exit 1 on a refusal, a peer that stops itself when asked (or when
// removed), and the CLI reaching the group through any listed peer that answers.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cliPath, freePort, hasTool, startEtcd, startPeer, startPeers } from './helpers/processes';

function oneLine(t: Tap.Test, r: { status: number | null; stderr: string }, pattern: RegExp, what: string): void {
  t.equal(r.status, 1, `${what}: exit 1`);
  t.equal(r.stderr.trim().split('\n').length, 1, `${what}: one line`);
  t.match(r.stderr, pattern, what);
}

/** Resolves with true when the process ended within `ms`. */
const endsWithin = (exited: Promise<unknown>, ms: number): Promise<boolean> => Promise.race([exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);

t.test('one peer: refusals, undrain, and `peer stop` stops it', async (t) => {
  const peer = await startPeer(t.teardown.bind(t));
  oneLine(t, peer.cli('peer', 'drain', 'p9'), /^peersan: no peer "p9" in the group \(members: p1\)/, 'unknown peer');
  oneLine(t, peer.cli('peer', 'drain', 'p1'), /p1 is the last placeable peer of the group/, 'the last placeable peer');
  oneLine(t, peer.cli('peer', 'remove', 'p1'), /peer p1 is up: drain it first \(peersan peer drain p1 --wait\)/, 'remove of an up peer');
  oneLine(t, peer.cli('peer', 'remove', 'p1', '--force'), /peer p1 answers: --force is only for a peer that is dead for good/, '--force of a live peer');
  oneLine(t, peer.cli('peer'), /peer needs --id ID/, 'peer without --id nor a command');
  const undrain = peer.cli('--json', 'peer', 'undrain', 'p1');
  t.equal(undrain.status, 0, undrain.stderr);
  t.match(JSON.parse(undrain.stdout), { id: 'p1', state: 'up' });

  const stop = peer.cli('peer', 'stop', 'p1');
  t.equal(stop.status, 0, stop.stderr);
  t.match(stop.stdout, /^peer p1 is leaving: it hands its primary roles over, asks its hosts to log out, then stops \(admin via p1 \(peer stop\)\)$/m);
  t.ok(await endsWithin(peer.exited, 20_000), 'the peer process ended by itself');
});

t.test('the CLI reaches the group through any listed peer that answers', async (t) => {
  const peer = await startPeer(t.teardown.bind(t));
  const config = join(peer.dir, 'two.yaml');
  // p0 is listed first and nobody listens there.
  writeFileSync(config, [
    'cluster:', '  name: test', '  adminToken: test-admin-token', '  secret: test-cluster-secret', '  catalog: { backend: embedded }',
    'peers:', `  - { id: p0, iscsi: 127.0.0.1:${await freePort()}, rpc: 127.0.0.1:${await freePort()}, http: 127.0.0.1:${await freePort()}, data: ./p0 }`,
    `  - { id: p1, iscsi: 127.0.0.1:${peer.iscsiPort}, rpc: 127.0.0.1:${peer.rpcPort}, http: 127.0.0.1:${peer.httpPort}, data: ./p1 }`, '',
  ].join('\n'));
  const r = spawnSync(process.execPath, [cliPath, '--config', config, '--json', 'status'], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.status, 0, r.stderr);
  t.equal(JSON.parse(r.stdout).peers[0].id, 'p1', 'answered by p1');
  const pinned = spawnSync(process.execPath, [cliPath, '--config', config, '--peer', '127.0.0.1:1', 'status'], { encoding: 'utf8', timeout: 60_000 });
  oneLine(t, pinned, /cannot reach peer at 127\.0\.0\.1:1/, '--peer still picks one');
});

t.test('two peers on etcd: drain --wait, remove, and the removed peer stops', { skip: hasTool('etcd') ? false : 'etcd not installed' }, async (t) => {
  const { endpoint } = await startEtcd(t.teardown.bind(t));
  const [p1, p2] = await startPeers(t.teardown.bind(t), { count: 2, etcd: endpoint });
  // A volume spread over both: half its pages are on p2, and the drain moves them to p1.
  t.equal(p1.cli('volume', 'create', 'v', '--size', '32M', '--replicas', '1').status, 0);
  oneLine(t, p1.cli('peer', 'remove', 'p2'), /peer p2 still holds copies of 4 page\(s\) \(4 as primary\): drain it first/, 'remove while it holds data');
  const drain = await p1.cliAsync('peer', 'drain', 'p2', '--wait');
  t.equal(drain.status, 0, drain.out);
  t.match(drain.out, /^peer p2 draining: 4 page copies left \(4 primary\), 0 session\(s\) left$/m, 'progress: what is left');
  t.match(drain.out, /^peer p2 draining: 0 page copies left \(0 primary\), 0 session\(s\) left$/m, 'progress: until empty');
  t.same(JSON.parse(p1.cli('--json', 'page', 'map', 'v').stdout).pages.map((x: { owner: string }) => x.owner), Array(8).fill('p1'), 'every page on p1 now');
  t.match(drain.out, /^peer p2 is drained: no copy left; remove it with `peersan peer remove p2`$/m);
  oneLine(t, p1.cli('peer', 'drain', 'p1'), /p1 is the last placeable peer/, 'the other one is the last placeable peer now');
  const removed = p1.cli('--json', 'peer', 'remove', 'p2');
  t.equal(removed.status, 0, removed.stderr);
  t.match(JSON.parse(removed.stdout), { id: 'p2', state: 'removed', changedBy: 'admin via p1' });
  t.ok(await endsWithin(p2.exited, 20_000), 'p2 saw itself removed and stopped');
  oneLine(t, p1.cli('peer', 'undrain', 'p2'), /peer p2 was removed from the group \(by admin via p1\)/, 'undrain of a removed peer');
});
