// The admin CLI against a real peer process: tables, --json, and one clear line on error.

import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cliPath, freePort, startPeer } from './helpers/processes';

t.test('volume lifecycle and errors through the CLI', async (t) => {
  const peer = await startPeer(t.teardown.bind(t));
  const created = peer.cli('--json', 'volume', 'create', 'vol1', '--size', '1G', '--block-size', '4096', '--allow', 'iqn.1994-05.com.example:h1');
  t.equal(created.status, 0, created.stderr);
  const v = JSON.parse(created.stdout);
  t.equal(v.sizeBytes, 1024 ** 3);
  t.equal(v.blockBytes, 4096);
  t.match(v.id, /^[0-9a-f]{16}$/);
  t.equal(v.targetName, 'iqn.2026-11.io.peersan:vol1');

  const list = peer.cli('volume', 'list');
  t.match(list.stdout, /^NAME\s+SIZE/m, 'a table with a header');
  t.match(list.stdout, /vol1\s+1\.0 GiB\s+4096/);

  t.equal(peer.cli('volume', 'resize', 'vol1', '--size', '2G').status, 0);
  t.equal(JSON.parse(peer.cli('--json', 'volume', 'show', 'vol1').stdout).sizeBytes, 2 * 1024 ** 3);
  const shrink = peer.cli('volume', 'resize', 'vol1', '--size', '1G');
  t.equal(shrink.status, 1);
  t.match(shrink.stderr, /^peersan: shrinking is not supported/);

  const oneLine = (r: { status: number | null; stderr: string }, pattern: RegExp, what: string): void => {
    t.equal(r.status, 1, `${what}: exit 1`);
    t.equal(r.stderr.trim().split('\n').length, 1, `${what}: one line`);
    t.match(r.stderr, pattern, what);
  };
  oneLine(peer.cli('volume', 'show', 'nope'), /no volume named nope/, 'unknown volume');
  oneLine(peer.cli('volume', 'create', 'vol1', '--size', '1G'), /already exists/, 'duplicate');
  oneLine(peer.cli('volume', 'create', 'Bad.Name', '--size', '1G'), /bad volume name/, 'bad name');
  oneLine(peer.cli('volume', 'create', 'x', '--size', '12Q'), /cannot read size/, 'bad size');
  oneLine(peer.cli('volume', 'create', 'x', '--size', '1G', '--chap-user', 'u', '--chap-secret', 'short'), /12 to 16 characters/, 'short CHAP secret');
  oneLine(peer.cli('--token', 'wrong', 'status'), /admin token missing or wrong/, 'bad token');
  const unreachable = spawnSync(process.execPath, [cliPath, '--peer', '127.0.0.1:1', '--token', 'x', 'status'], { encoding: 'utf8', timeout: 60_000 });
  oneLine({ status: unreachable.status, stderr: unreachable.stderr }, /cannot reach peer at 127\.0\.0\.1:1/, 'no peer there');

  const status = JSON.parse(peer.cli('--json', 'status').stdout);
  t.equal(status.peers[0].id, 'p1');
  t.equal(status.peers[0].up, true);

  t.equal(peer.cli('volume', 'delete', 'vol1').status, 0);
  t.match(peer.cli('volume', 'list').stdout, /no volumes/);
});

t.test('copies per page through the CLI: create, set, show, page map, status', async (t) => {
  const peer = await startPeer(t.teardown.bind(t));
  const created = peer.cli('--json', 'volume', 'create', 'rep', '--size', '64M', '--replicas', '2');
  t.equal(created.status, 0, created.stderr);
  t.equal(JSON.parse(created.stdout).replicas, 2, 'the number asked is kept');
  const shown = JSON.parse(peer.cli('--json', 'volume', 'show', 'rep').stdout);
  t.equal(shown.protection, 'healthy', 'a one-peer group holds every copy it can: healthy');
  t.match(shown.protectionDetail, { state: 'healthy', pages: 16, wanted: 1, degradedPages: 0, rebuildingPages: 0, unavailablePages: 0 });
  t.match(peer.cli('volume', 'show', 'rep').stdout, /^copies: 2 per page$/m);
  t.match(peer.cli('volume', 'show', 'rep').stdout, /^protection: healthy$/m);
  t.match(peer.cli('volume', 'list').stdout, /rep\s+64\.0 MiB\s+512\s+\S+ \S+\s+2\s+healthy/);

  const set = peer.cli('--json', 'volume', 'set', 'rep', '--replicas', '3');
  t.equal(set.status, 0, set.stderr);
  t.equal(JSON.parse(set.stdout).replicas, 3);
  const tooMany = peer.cli('volume', 'set', 'rep', '--replicas', '4');
  t.equal(tooMany.status, 1);
  t.match(tooMany.stderr, /^peersan: --replicas must be a whole number from 1 to 3, got "4"$/m);
  t.match(peer.cli('volume', 'set', 'rep').stderr, /volume set needs --auto-balance on\|off or --replicas N/);
  t.match(peer.cli('volume', 'create', 'zero', '--size', '1M', '--replicas', '0').stderr, /--replicas must be a whole number from 1 to 3/);

  const map = JSON.parse(peer.cli('--json', 'page', 'map', 'rep').stdout);
  t.same(map.pages[0], { page: 0, owner: 'p1', version: 1, copies: ['p1'], inSync: ['p1'] }, 'page map: the primary and its copies');
  t.match(peer.cli('page', 'map', 'rep').stdout, /^PAGES\s+OWNER\s+COPIES\s+VERSION$/m);
  t.match(peer.cli('status').stdout, /^volumes: 1 healthy$/m);
  t.match(JSON.parse(peer.cli('--json', 'status').stdout).protection, { healthy: 1, degraded: 0 });
});

t.test('demo without --data removes its folder when it stops; with --data keeps it', async (t) => {
  const tmp = mkdtempSync(join(tmpdir(), 'peersan-demo-test-'));
  t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
  /** One demo peer with its temporary folders under `tmp`, stopped by SIGINT once ready; its output. */
  const run = async (...extra: string[]): Promise<string> => {
    const ports = [await freePort(), await freePort(), await freePort()].map(String);
    const child = spawn(process.execPath, [cliPath, 'demo', '--peers', '1', '--size', '64M', '--iscsi-port', ports[0], '--rpc-port', ports[1], '--http-port', ports[2], ...extra],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, TMPDIR: tmp } });
    const exited = new Promise<void>((r) => child.once('exit', () => r()));
    t.teardown(() => void (child.exitCode === null && child.signalCode === null && child.kill('SIGKILL')));
    let out = '';
    child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr!.on('data', (c: Buffer) => (out += c.toString()));
    const deadline = Date.now() + 60_000;
    while (!/^ready$/m.test(out) && child.exitCode === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    t.match(out, /^ready$/m, 'the demo started');
    child.kill('SIGINT');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 30_000))]);
    return out;
  };
  const thrown = await run();
  const made = /data in (\S+) \(removed when the demo stops; --data DIR keeps it\)/.exec(thrown)?.[1];
  t.ok(made?.startsWith(tmp), `the folder is made under TMPDIR: ${thrown}`);
  t.match(thrown, new RegExp(`^stopped; removed ${made}$`, 'm'), 'it says it removed the folder');
  t.notOk(made && existsSync(made), 'and the folder is gone');
  t.same(readdirSync(tmp), [], 'nothing left under TMPDIR');

  const kept = join(tmp, 'kept');
  const out = await run('--data', kept);
  t.match(out, /^stopped$/m, 'with --data: stopped, nothing removed');
  t.ok(existsSync(join(kept, 'cluster.yaml')), 'the --data folder is kept');
});
