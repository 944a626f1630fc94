// The console in a real browser: `peersan demo` (3 peers in one process) and headless
// Chromium driven by playwright-core. A person would see: the token prompt (a wrong token is
// refused), the three peers up, a volume created from the page appear in the list, the used
// space of every peer grow while qemu-img bench writes through p1, the page map coloured by
// owner, the operations that other features bring (heat, page moves, migrations, balancer)
// marked "not available on this peer yet" until the peer has them, a resize and a delete
// from the page, and each change in the events panel. Screenshots go to test-artifacts/console/.

import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page } from 'playwright-core';
import { browserMissing, openBrowserPage } from './helpers/browser';
import { cliPath, hasTool, qemuImg, repoRoot } from './helpers/processes';
import { http } from './helpers/http-client';

const token = 'console-test-token';
const chapSecret = 'Cons0le-Secret7';
const artifacts = join(repoRoot, 'test-artifacts', 'console');

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/** A base port with `count` free ports from it (demo peers listen on base + i). */
async function freeRun(count: number, taken: Set<number>): Promise<number> {
  for (let tries = 0; tries < 200; tries++) {
    // Below the ephemeral range (32768-), where no outgoing connection takes a local port.
    const base = 20_000 + Math.floor(Math.random() * 12_000);
    const ports = Array.from({ length: count }, (_, i) => base + i);
    if (ports.some((p) => taken.has(p))) continue;
    if ((await Promise.all(ports.map(portFree))).every(Boolean)) {
      for (const p of ports) taken.add(p);
      return base;
    }
  }
  throw new Error('no run of free ports found');
}

/** `peersan demo` as a child process, stopped (SIGINT, then SIGKILL) by the teardown. */
async function startDemo(t: Tap.Test): Promise<{ http: string; iscsi: string }> {
  const taken = new Set<number>();
  const [iscsi, rpc, httpPort] = [await freeRun(3, taken), await freeRun(3, taken), await freeRun(3, taken)];
  const dir = mkdtempSync(join(tmpdir(), 'peersan-console-'));
  const child = spawn(process.execPath, [cliPath, 'demo', '--peers', '3', '--size', '256M', '--data', dir, '--token', token,
    '--iscsi-port', String(iscsi), '--rpc-port', String(rpc), '--http-port', String(httpPort)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr!.on('data', (c: Buffer) => (out += c.toString()));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGINT');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 15_000))]);
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
    rmSync(dir, { recursive: true, force: true });
  });
  const deadline = Date.now() + 90_000;
  while (!/^ready$/m.test(out)) {
    if (child.exitCode !== null) throw new Error(`demo exited: ${out}`);
    if (Date.now() > deadline) throw new Error(`demo not ready in 90 s: ${out}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  t.match(out, new RegExp(`console: http://127\\.0\\.0\\.1:${httpPort}/`), 'demo prints the console address');
  return { http: `http://127.0.0.1:${httpPort}`, iscsi: `127.0.0.1:${iscsi}` };
}

async function shot(page: Page, name: string): Promise<void> {
  await page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });
}

/** Text of a peer's cell, e.g. used('p2', 'used'). */
function cell(page: Page, peer: string, field: string): Promise<string> {
  return page.locator(`#peers tr[data-peer="${peer}"] td[data-field="${field}"]`).innerText();
}

t.test('console in headless Chromium against peersan demo', { skip: browserMissing }, async (t) => {
  mkdirSync(artifacts, { recursive: true });
  const demo = await startDemo(t);
  const { page, pageErrors } = await openBrowserPage(t);

  await t.test('a wrong token is refused, the right one opens the console', async (t) => {
    await page.goto(`${demo.http}/`);
    await page.waitForSelector('#token-dialog[open]');
    await shot(page, '01-token');
    await page.fill('#token-input', 'not-the-token');
    await page.click('#token-form button');
    await page.waitForFunction(() => document.getElementById('token-error')!.textContent!.includes('refused'));
    t.ok(await page.locator('#main').isHidden(), 'nothing shown without the token');
    await page.fill('#token-input', token);
    await page.click('#token-form button');
    await page.waitForSelector('#peers tbody tr[data-peer="p3"]');
    await page.waitForSelector('#live.on');
    const states = await page.locator('#peers tbody .badge').allInnerTexts();
    t.same(states, ['up', 'up', 'up'], 'three peers up');
    t.match(await page.locator('#cluster-name').innerText(), /cluster demo · console served by p1/);
    await shot(page, '02-group');
  });

  await t.test('create a volume from the page and see it listed (no secret shown back)', async (t) => {
    // The page map's counts below are exact: automatic balancing (pages follow the bench's host,
    // which writes through p1) would move pages under them. The switch the console shows.
    t.equal((await http(demo.http, 'PUT', '/api/rebalancing', { token, body: { enabled: false } })).status, 200, 'automatic balancing off for the group');
    await page.click('#create-box summary');
    await page.fill('#create-form input[name=name]', 'web');
    await page.fill('#create-form input[name=size]', '128M');
    await page.fill('#create-form input[name=chapUser]', 'webhost');
    await page.fill('#create-form input[name=chapSecret]', chapSecret);
    await page.click('#create-form button[type=submit]');
    await page.waitForSelector('#volumes tr[data-volume="web"]');
    t.match(await page.locator('#create-result').innerText(), /created web \(128 MiB, \d cop(y|ies) of each page\) on p1, p2, p3/);
    t.match(await page.locator('#volumes tr[data-volume="web"]').innerText(), /128 MiB[\s\S]*p1, p2, p3[\s\S]*any initiator, CHAP/);
    t.equal(await page.locator('#create-form input[name=chapSecret]').inputValue(), '', 'the secret field is cleared');
    t.notMatch(await page.content(), chapSecret, 'the secret is nowhere in the page');
    await page.waitForSelector('#events li[data-kind="volume-created"]:has-text("volume web created")');
    // A bad request shows the admin layer's one line, as the CLI would.
    await page.fill('#create-form input[name=name]', 'web');
    await page.fill('#create-form input[name=size]', '8M');
    await page.click('#create-form button[type=submit]');
    await page.waitForSelector('#create-result.error');
    t.equal(await page.locator('#create-result').innerText(), 'volume web already exists');
    await shot(page, '03-created');
  });

  await t.test('the page map of the new volume, coloured by owner', async (t) => {
    t.equal(await page.locator('#volumes tr[data-volume="web"] td[data-field="protection"]').innerText(), '2 · healthy', 'copies asked (the default, 2) and protection');
    await page.click('#volumes tr[data-volume="web"] button:has-text("web")');
    await page.waitForSelector('#page-map[data-pages="32"]');
    t.equal(await page.locator('#page-map').getAttribute('data-owners'), 'p1:11,p2:11,p3:10', '32 pages striped over three peers');
    t.same(await page.locator('#legend [data-owner]').allInnerTexts(), ['p1: 11 pages', 'p2: 11 pages', 'p3: 10 pages']);
    await page.locator('#page-map').hover({ position: { x: 3, y: 3 } });
    t.match(await page.locator('#map-hover').innerText(), /^page 0 · owner p1 · copies p1, p2 · route v1 · blocks 0–8191/);
    await page.locator('#page-map').click({ position: { x: 3, y: 3 } });
    t.equal(await page.locator('#move-form input[name=page]').inputValue(), '0', 'a click picks the page for a move');
    const fills = await Promise.all(['p1', 'p2', 'p3'].map((p) => cell(page, p, 'fill')));
    t.ok(fills.every((f) => /^\d+ of \d+ \(\d+%\)$/.test(f)), `each peer's page copies of its share by capacity: ${fills.join(' / ')}`);
  });

  const tools = hasTool('qemu-img');
  await t.test('qemu-img bench through p1 moves the per-peer figures', { skip: tools ? false : 'qemu-img not installed' }, async (t) => {
    const usedBefore = await Promise.all(['p1', 'p2', 'p3'].map((p) => cell(page, p, 'used')));
    t.same(usedBefore, ['0 B', '0 B', '0 B'], 'nothing written yet');
    const bench = await qemuImg(['bench', '-w', '-c', '2048', '-d', '16', '-s', '64k', '--pattern=90', '-f', 'raw', `iscsi://webhost%${chapSecret}@${demo.iscsi}/iqn.2026-11.io.peersan:web/0`], 180_000);
    t.match(bench, /Run completed/);
    // A state pushed during the bench shows part of it; a later push (every 2 s) the whole.
    // Two copies of each page over three peers: each holds two thirds of what was written.
    const twoThirds = /^8\d(\.\d)? MiB$/;
    await page.waitForFunction((re) => ['p1', 'p2', 'p3'].every((p) => new RegExp(re).test(document.querySelector(`#peers tr[data-peer="${p}"] td[data-field="used"]`)?.textContent ?? '')), twoThirds.source, { timeout: 30_000 })
      .catch(() => undefined);
    const usedAfter = await Promise.all(['p1', 'p2', 'p3'].map((p) => cell(page, p, 'used')));
    t.ok(usedAfter.every((u) => twoThirds.test(u)), `each peer holds two thirds of 128 MiB (two copies): ${usedAfter.join(' / ')}`);
    await page.waitForFunction(() => /\(2\d{3} operations, 128 MiB since start\)/.test(document.getElementById('host-io')!.textContent!));
    t.match(await page.locator('#host-io').innerText(), /^Host I\/O arriving at p1: \d+ IOPS/);
    t.match(await page.locator('#volumes tr[data-volume="web"]').innerText(), /8\d(\.\d)? MiB/, 'the volume\'s use on p1');
    const metrics = (await http(demo.http, 'GET', '/metrics')).text;
    t.match(metrics, /peersan_host_io_bytes_total\{volume="web",op="write",peer="p1"\} 134217728/, '/metrics agrees: 128 MiB written through p1');
    await shot(page, '04-after-io');
  });

  await t.test('heat and per-peer load after the bench; a page move from the page completes', async (t) => {
    const state = (await http(demo.http, 'GET', '/api/status', { token })).json();
    const f = state.features as Record<string, boolean>;
    t.ok(f.pageHeat && f.peerLoads && f.movePage && f.listMigrations && f.setRebalancing, `the peer has heat, load, moves, migrations and the balancer switch (${JSON.stringify(f)})`);
    await page.waitForFunction(() => Number(document.getElementById('page-map')!.dataset.heatMax) > 0);
    t.pass('heat drawn on the page map');
    // Every peer owns a third of the pages the bench wrote: each shows load as page owner.
    await page.waitForFunction(() => ['p1', 'p2', 'p3'].every((p) => /[1-9]\d* IOPS/.test(document.querySelector(`#peers tr[data-peer="${p}"] td[data-field="load"]`)?.textContent ?? '')), undefined, { timeout: 30_000 });
    const loads = await Promise.all(['p1', 'p2', 'p3'].map((p) => cell(page, p, 'load')));
    t.ok(loads.every((l) => /[1-9]\d* IOPS/.test(l)), `per-peer load after the bench: ${loads.join(' / ')}`);
    // A copy dropped under the bench's load (slower than replicaAckMsMax) resyncs first; a role
    // switch to a copy still resyncing is refused, so the move waits for a healthy volume.
    await page.waitForFunction(() => document.querySelector('#volumes tr[data-volume="web"] td[data-field="protection"]')?.textContent === '2 · healthy', undefined, { timeout: 60_000 });
    await page.selectOption('#move-form select[name=to]', 'p2');
    await page.click('#move-form button[type=submit]');
    await page.waitForFunction(() => document.getElementById('page-map')!.dataset.owners === 'p1:10,p2:12,p3:10', undefined, { timeout: 60_000 });
    await page.waitForSelector('#events li[data-kind="page-moved"]');
    t.match(await page.locator('#events li[data-kind="page-moved"]').first().innerText(), /page 0 of web: primary role switched from p1 to p2 \(no data copied\)/, 'the event says what moved (p2 held page 0\'s second copy: a role switch)');
    t.match(await page.locator('#migrations').innerText(), /No page is moving/, 'nothing left in flight');
    await page.fill('#snapshot-form input[name=name]', 'nightly');
    await page.click('#snapshot-form button[type=submit]');
    await page.waitForSelector('#snapshot-result:has-text("snapshot nightly taken")');
    await page.waitForSelector('#snapshots li:has-text("nightly")');
    t.match(await page.locator('#snapshots').innerText(), /nightly · .* · barrier · hosts held [\d.]+ ms · iqn\.2026-11\.io\.peersan:web\.nightly/, 'the snapshot is listed with its hold time and target');
    await page.waitForSelector('#events li[data-kind="snapshot"]');
    await shot(page, '05-volume');
  });

  await t.test('change the allow list and CHAP from the page', async (t) => {
    await page.fill('#access-form textarea[name=allow]', 'iqn.1994-05.com.example:app1\niqn.1994-05.com.example:app2');
    await page.check('#access-form input[name=chapOff]');
    await page.click('#access-form button[type=submit]');
    await page.waitForSelector('#access-result.ok');
    t.equal(await page.locator('#access-result').innerText(), 'access of web: 2 initiators');
    await page.waitForSelector('#volumes tr[data-volume="web"]:has-text("2 initiators")');
    await page.waitForSelector('#events li[data-kind="volume-access"]');
  });

  await t.test('resize and delete from the page', async (t) => {
    await page.fill('#resize-form input[name=size]', '192M');
    await page.click('#resize-form button[type=submit]');
    await page.waitForSelector('#resize-result.ok');
    await page.waitForSelector('#volumes tr[data-volume="web"]:has-text("192 MiB")');
    await page.waitForSelector('#page-map[data-pages="48"]');
    await page.click('#delete-form button[type=submit]');
    await page.waitForSelector('#volumes tr[data-volume="web"]', { state: 'detached' });
    await page.waitForSelector('#events li[data-kind="volume-deleted"]:has-text("volume web deleted")');
    t.ok(await page.locator('#volume-panel').isHidden(), 'the volume panel closes');
    t.match(await page.locator('#events').innerText(), /volume web resized 128 MiB → 192 MiB/);
    await shot(page, '06-deleted');
    t.same(pageErrors, [], 'no script error in the page');
  });

  await t.test('a 64 TiB volume: the map shows the whole volume\'s counts and one range of pages at a time (◀ ▶)', async (t) => {
    t.equal((await http(demo.http, 'POST', '/api/volumes', { token, body: { name: 'huge', size: '64T' } })).status, 201);
    await page.waitForSelector('#volumes tr[data-volume="huge"]');
    await page.click('#volumes tr[data-volume="huge"] button:has-text("huge")');
    await page.waitForSelector('#page-map[data-pages="16777216"][data-from="0"]');
    t.equal(await page.locator('#page-map').getAttribute('data-owners'), 'p1:5592406,p2:5592405,p3:5592405', 'counts of the whole volume, by the placement rule');
    t.equal(await page.locator('#map-range-text').innerText(), 'pages 0–4095 of 16777216');
    t.ok(await page.locator('#map-prev').isDisabled(), 'no range before the first');
    await page.click('#map-next');
    await page.waitForSelector('#page-map[data-from="4096"]');
    t.equal(await page.locator('#map-range-text').innerText(), 'pages 4096–8191 of 16777216');
    await page.locator('#page-map').hover({ position: { x: 3, y: 3 } });
    t.match(await page.locator('#map-hover').innerText(), /^page 4096 · owner p2 /, 'a cell is a page of the range shown');
    await page.click('#map-prev');
    await page.waitForSelector('#page-map[data-from="0"]');
    t.same(pageErrors, [], 'no script error in the page');
  });
});
