// Three `peersan peer` processes sharing their catalog through etcd, driven by real clients:
// a volume spread over all three with two copies of each page (the default), data written
// through one portal reads back through the others; after kill -9 of one peer its pages are
// served by their other copies at once, writes go on, and after a restart the peer catches up
// (healthy again) with nothing lost; and libiscsi's conformance suite over two paths that go
// through different peers.

import t from 'tap';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { failoverWaitMsMax } from '../src/limits';
import { execFileSync } from 'node:child_process';
import { hasTool, qemuImg, qemuIo, repoRoot, startEtcd, startPeers } from './helpers/processes';
import { waitProtection } from './helpers/replicas';

const tools = ['etcd', 'qemu-img', 'qemu-io', 'iscsi-test-cu'];
const missing = tools.filter((x) => !hasTool(x));
const pageBytes = 8192 * 512;

t.test('a group of three peer processes on etcd', { skip: missing.length ? `missing ${missing.join(', ')} (.ci/run installs etcd-server, qemu-utils, libiscsi-bin)` : false }, async (t) => {
  const { endpoint } = await startEtcd(t.teardown.bind(t));
  // Pages stay where placement put them (the checks below name their owners) and hosts stay on
  // the portal they asked for: no balancer, no host balancing.
  const [p1, p2, p3] = await startPeers(t.teardown.bind(t), { count: 3, etcd: endpoint, clusterYaml: ['hostBalance: { enabled: false }'], rootYaml: ['balancer: { enabled: false }'] });
  const created = p2.cli('volume', 'create', 'data', '--size', '256M');
  t.equal(created.status, 0, created.stdout.trim() || created.stderr.trim());
  t.match(p3.cli('volume', 'show', 'data').stdout, /placed on:\s+p1, p2, p3/, 'every peer sees the volume');
  t.match(p3.cli('volume', 'show', 'data').stdout, /^copies: 2 per page$/m, 'two copies of each page by default');

  const file = join(p1.dir, 'random.img');
  writeFileSync(file, randomBytes(256 * 1024 * 1024));

  await t.test('written through p1, identical through p2 and p3; pages on all three', async (t) => {
    await qemuImg(['convert', '-n', '-f', 'raw', '-O', 'raw', file, p1.url('data')], 300_000);
    for (const via of [p2, p3]) t.match(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', file, via.url('data')], 300_000), /Images are identical/, `through ${via.id}`);
    const map = JSON.parse(p3.cli('--json', 'page', 'map', 'data').stdout) as { pages: { owner: string }[] };
    t.same([...new Set(map.pages.map((p) => p.owner))].sort(), ['p1', 'p2', 'p3']);
    t.match(p1.cli('page', 'map', 'data').stdout, /pages per peer: p1 22, p2 21, p3 21/);
  });

  await t.test('kill -9 p2: its pages are served by their other copies, writes go on; restart: healthy again, nothing lost', async (t) => {
    await p2.kill('SIGKILL');
    // Page 1's primary was p2 (copies p2, p3): p3 takes over once p2's lease has run out.
    const expected = randomSlice(file, 1 * pageBytes, 4096);
    const read = await qemuIo(p1.url('data'), `read -v ${1 * pageBytes} 16`);
    t.ok(read.ok, `p2's page read through p1: ${read.out.trim().split('\n').pop()}`);
    t.match(read.out, new RegExp(expected.subarray(0, 4).toString('hex').replace(/(..)/g, '$1 ').trim()), 'with the right bytes');
    t.ok(read.ms < failoverWaitMsMax, `within the failover bound (${read.ms} ms)`);
    const written = await qemuIo(p3.url('data'), `write -P 0x6b ${1 * pageBytes + 8192} 65536`);
    t.ok(written.ok, `a write to p2's page through p3 while p2 is down: ${written.out.trim().split('\n').pop()}`);
    t.ok((await qemuIo(p3.url('data'), `read 0 65536`)).ok, 'a p1 page through p3');
    t.match(p1.cli('status').stdout, /p2\s+down/, 'status shows p2 down');
    t.match(p1.cli('volume', 'show', 'data').stdout, /^protection:\s+degraded/m, 'the volume says degraded');
    await p2.start();
    const ms = await waitProtection(() => [p1, p3], 'data', 'healthy', 120_000);
    t.pass(`healthy again ${ms} ms after p2's restart`);
    const back = await qemuIo(p2.url('data'), `read -P 0x6b ${1 * pageBytes + 8192} 65536`);
    t.ok(back.ok, `the write made while p2 was down reads back through p2: ${back.out.trim().split('\n').pop()}`);
    await p3.kill('SIGKILL');
    const after = await qemuIo(p1.url('data'), `read -P 0x6b ${1 * pageBytes + 8192} 65536`);
    t.ok(after.ok, `and through p1 once p3 is gone too (p2's resynced copy serves): ${after.out.trim().split('\n').pop()}`);
    await p3.start();
    await waitProtection(() => [p1, p2], 'data', 'healthy', 120_000);
  });

  await t.test('libiscsi conformance over two paths through p1 and p3: no failures', async (t) => {
    // A fresh volume: some libiscsi tests assume blocks they did not write read as zeros.
    t.equal(p1.cli('volume', 'create', 'conf', '--size', '256M').status, 0);
    let out = '';
    try {
      out = execFileSync('node', [join(repoRoot, 'bench', 'conformance.js'), '--url', p1.url('conf'), '--url2', p3.url('conf')], { encoding: 'utf8', timeout: 900_000, maxBuffer: 64 * 1024 * 1024 });
    } catch (err) {
      out = String((err as { stdout?: string }).stdout ?? err);
    }
    t.comment(out.split('\n')[0]);
    const m = /(\d+) tests: (\d+) clean, (\d+) skipped, (\d+) failed/.exec(out);
    t.ok(m, 'scored');
    if (!m) return;
    t.equal(Number(m[4]), 0, `no failed tests${Number(m[4]) ? ': ' + out.split('\n').filter((l) => l.includes('failed ')).slice(0, 5).join('; ') : ''}`);
    t.match(out, /CUnit: \d+ ran, \d+ passed, 0 failed/, "CUnit's own summary agrees");
    t.ok(Number(m[2]) >= 520, `at least 520 clean passes (measured: 527; tgt 1.0.85: 448), got ${m[2]}`);
  });
});

function randomSlice(file: string, offset: number, length: number): Buffer {
  const fd = openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}
