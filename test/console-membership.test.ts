// The console of a group of peer processes on etcd, in headless Chromium (issue 18, acceptance
// 5): a fourth peer started with its entry appended to cluster.yaml appears in the peers table
// of a console served by p1 within 10 s of its start, and its join is in the events panel; a
// drain of it asked through p2 shows in the table (draining) and the events, with who asked; its
// copies column follows it filling by itself, then emptying as it drains.

import t from 'tap';
import { browserMissing, openBrowserPage, openConsole } from './helpers/browser';
import { appendPeer, hasTool, startEtcd, startPeers } from './helpers/processes';

const skip = browserMissing || (hasTool('etcd') ? false : 'missing etcd (.ci/run installs etcd-server)');

t.test('the console shows a peer joining, live', { skip }, async (t) => {
  const { endpoint } = await startEtcd(t.teardown.bind(t));
  const group = await startPeers(t.teardown.bind(t), { count: 3, etcd: endpoint });
  t.equal(group[0].cli('volume', 'create', 'web', '--size', '64M').status, 0, 'a volume of 16 pages, 2 copies each');
  const { page, pageErrors } = await openBrowserPage(t);
  await openConsole(page, `http://127.0.0.1:${group[0].httpPort}`, 'test-admin-token');
  // Rows come in join order (portal group tag): p2 and p3 start together, so either may be first.
  const rows = await page.locator('#peers tbody tr[data-peer]').evaluateAll((rs) => rs.map((r) => r.getAttribute('data-peer')));
  t.same([...rows].sort(), ['p1', 'p2', 'p3'], `three peers (${rows.join(', ')})`);

  const p4 = await appendPeer(t.teardown.bind(t), group);
  await p4.start();
  const started = Date.now();
  await page.waitForSelector('#peers tbody tr[data-peer="p4"]', { timeout: 10_000 });
  t.pass(`p4 in the peers table ${Date.now() - started} ms after it came up`);
  t.match(await page.locator('#peers tbody tr[data-peer="p4"]').innerText(), /p4[\s\S]*up/, 'and up');
  await page.waitForSelector('#events li[data-kind="member"]:has-text("peer p4 joined")');
  t.pass('its join is in the events panel');
  const fill = page.locator('#peers tbody tr[data-peer="p4"] td[data-field="fill"]');
  await page.waitForFunction(() => /^[1-9]\d* of /.test(document.querySelector('#peers tbody tr[data-peer="p4"] td[data-field="fill"]')?.textContent ?? ''), undefined, { timeout: 90_000 });
  t.pass(`p4 fills by itself, shown live: ${await fill.innerText()}`);

  const drain = group[1].cli('peer', 'drain', 'p4');
  t.equal(drain.status, 0, drain.stdout.trim() || drain.stderr.trim());
  await page.waitForSelector('#peers tbody tr[data-peer="p4"] .badge:has-text("draining")', { timeout: 10_000 });
  await page.waitForSelector('#events li[data-kind="member"]:has-text("peer p4 draining")');
  t.pass('the drain shows live: p4 draining in the table and in the events, with who asked');
  t.match(await page.locator('#events li[data-kind="member"]:has-text("peer p4 draining")').first().innerText(), /admin/, 'who asked');
  await page.waitForFunction(() => /^0 \(takes none\)/.test(document.querySelector('#peers tbody tr[data-peer="p4"] td[data-field="fill"]')?.textContent ?? ''), undefined, { timeout: 90_000 });
  t.pass(`the drain's progress shows live down to ${await fill.innerText()}`);
  t.same(pageErrors, [], 'no script error in the page');
});
