// Online membership with real processes on etcd (issue 18, DESIGN.md 11): a fourth peer whose
// entry is appended to cluster.yaml while p1-p3 run on the file as they read it joins with no
// restart of the others, receives copies of an existing volume's pages by itself with no host
// I/O, and serves the data (acceptance 1); a second process with a running peer's id and a peer
// whose data directory belongs to another group are refused at start, each with one clear line;
// p1 drained and removed, the data still identical through p2 and p4 (acceptance 2).

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { appendPeer, cliPath, qemuImg, startEtcd, startPeers, type TestPeer } from './helpers/processes';
import { identical, pageCopies, replicatedTestSkip } from './helpers/replicas';

const skip = replicatedTestSkip(['etcd', 'qemu-img']);

/** `peersan peer` for `id` with `config`, run to its end: a refused start exits at once. */
function startRefused(config: string, id: string): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [cliPath, 'peer', '--config', config, '--id', id], { encoding: 'utf8', timeout: 30_000 });
  return { status: r.status, stderr: r.stderr };
}

/** The ids `status --json` asked of `via` lists. */
function statusIds(via: TestPeer): string[] {
  const r = via.cli('--json', 'status');
  return r.status === 0 ? (JSON.parse(r.stdout) as { peers: { id: string }[] }).peers.map((p) => p.id) : [];
}

async function waitFor<T>(what: () => Promise<T> | T, done: (v: T) => boolean, timeoutMs: number): Promise<{ value: T; ms: number }> {
  const started = Date.now();
  for (;;) {
    const value = await what();
    if (done(value) || Date.now() - started > timeoutMs) return { value, ms: Date.now() - started };
    await new Promise((r) => setTimeout(r, 1_000));
  }
}

t.test('a fourth peer joins a running group of three and receives copies by itself', { skip }, async (t) => {
  const { endpoint } = await startEtcd(t.teardown.bind(t));
  const group = await startPeers(t.teardown.bind(t), { count: 3, etcd: endpoint });
  const [p1, p2] = group;
  const created = p1.cli('volume', 'create', 'data', '--size', '512M');
  t.equal(created.status, 0, created.stdout.trim() || created.stderr.trim());
  const file = join(p1.dir, 'random.img');
  writeFileSync(file, randomBytes(256 * 1024 * 1024));
  await qemuImg(['convert', '-n', '-f', 'raw', '-O', 'raw', file, p1.url('data')], 300_000);

  const p4 = await appendPeer(t.teardown.bind(t), group);
  const startedMs = Date.now();
  await p4.start();
  const seen = await waitFor(() => statusIds(p1), (ids) => ids.includes('p4'), 10_000);
  t.ok(seen.value.includes('p4'), `p1 (running on the three-peer file) lists p4 ${seen.ms} ms after p4 came up`);

  const pages = 512 / 4;
  const onP4 = async (): Promise<number> => (await pageCopies(p1, 'data')).filter((p) => p.copies.includes('p4')).length;
  const spread = await waitFor(onP4, (n) => n >= 0.15 * pages, 180_000);
  t.ok(spread.value >= 0.15 * pages, `${spread.value} of ${pages} pages have a copy on p4 ${Math.round((Date.now() - startedMs) / 1000)} s after its start, with no host I/O (at least 15 % within 3 minutes)`);
  await identical(t, file, p4);

  await t.test('a second process with a running peer\'s id is refused', async (t) => {
    const r = startRefused(p2.config, 'p2');
    t.not(r.status, 0, 'exits non-zero');
    t.match(r.stderr, /peer p2 is already running/, r.stderr.trim().split('\n').pop() ?? '');
    t.ok(statusIds(p1).includes('p2'), 'the running p2 is untouched');
  });

  await t.test('a peer whose data directory belongs to another group is refused', async (t) => {
    const p5 = await appendPeer(t.teardown.bind(t), [...group, p4]);
    mkdirSync(join(p5.dir, 'p5'), { recursive: true });
    writeFileSync(join(p5.dir, 'p5', 'group.json'), JSON.stringify({ cluster: 'elsewhere', group: '0123456789abcdef' }));
    const r = startRefused(p5.config, 'p5');
    t.not(r.status, 0, 'exits non-zero');
    t.match(r.stderr, /belongs to group "elsewhere"/, r.stderr.trim().split('\n').pop() ?? '');
  });

  await t.test('p1 drained and removed: nothing on it, gone from status, the data identical through p2 and p4', async (t) => {
    const drained = await p2.cliAsync('peer', 'drain', 'p1', '--wait');
    t.equal(drained.status, 0, `drain --wait exits 0: ${drained.out.trim().split('\n').pop()}`);
    const held = (await pageCopies(p2, 'data')).filter((p) => p.copies.includes('p1')).length;
    t.equal(held, 0, 'p1 holds no copy of any page');
    const removed = await p2.cliAsync('peer', 'remove', 'p1');
    t.equal(removed.status, 0, removed.out.trim());
    t.notOk(statusIds(p2).includes('p1'), `status asked of p2 no longer lists p1 (${statusIds(p2).join(', ')})`);
    await identical(t, file, p2);
    await identical(t, file, p4);
  });
});
