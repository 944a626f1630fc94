// Operators are told the truth (issue 15 item 12): no "not shut down cleanly" warning on a
// brand-new store, the balancer's cool-down after a move resumed across a restart, and
// `page move --wait` following a move whose source was killed to its real end.

import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { PageStore } from '../src/store/page-store';
import { startGroup } from './helpers/group';

/** A pino logger whose lines land in `lines` (parsed). */
function capture(): { log: pino.Logger; lines: { level: number; msg: string }[] } {
  const lines: { level: number; msg: string }[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(l));
      cb();
    },
  });
  return { log: pino({ level: 'info' }, sink), lines };
}

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-operator-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const uncleanWarnings = (lines: { level: number; msg: string }[]): number => lines.filter((l) => l.level >= 40 && /not shut down cleanly/.test(l.msg)).length;

t.test('a brand-new store does not warn that it was not shut down cleanly; a crashed one does', async (t) => {
  const dir = tempDir(t);
  const first = capture();
  const store = await PageStore.open(dir, { log: first.log });
  t.equal(uncleanWarnings(first.lines), 0, 'first start: no warning');
  t.equal(store.wasClean, true, 'first start counts as clean');
  await store.putRecord('x', Buffer.from('1'), true);
  await store.close();

  const second = capture();
  const again = await PageStore.open(dir, { log: second.log });
  t.equal(uncleanWarnings(second.lines), 0, 'after a clean stop: no warning');
  // A crash: the process ends without close(), so the clean mark (cleared at open) stays absent.
  await (again as unknown as { db: { close(): Promise<void> } }).db.close();

  const third = capture();
  const crashed = await PageStore.open(dir, { log: third.log });
  t.teardown(() => crashed.close());
  t.equal(uncleanWarnings(third.lines), 1, 'after a crash: one warning');
  t.equal(crashed.wasClean, false);
});

t.test('a move resumed after a restart of its source starts the balancer cool-down when it commits', async (t) => {
  const g = await startGroup(t, 3, { migration: { rateMBps: 2 } }); // 4 MiB page: about 2 s
  await g.peer('p1').createVolume({ name: 'vol', size: '48M' });
  const page = 0; // on p1
  const info = await g.peer('p1').movePage('vol', page, 'p3');
  for (let i = 0; i < 200 && (g.peer('p1').migration.list()[0]?.done ?? 0) < 4; i++) await new Promise((r) => setTimeout(r, 50));
  await g.peer('p1').stop();
  const p1 = await g.start('p1');
  t.equal(p1.migration.list().length, 1, 'the move resumed after the restart');
  await p1.migration.wait(info.volumeId, page);
  t.equal((await g.peer('p2').pageMap('vol')).pages[page].owner, 'p3', 'the move committed');
  const cooling = p1.loadService!.driver.recentMoves().filter((m) => m.volumeId === info.volumeId && m.page === page);
  t.equal(cooling.length, 1, 'the source remembers the move for its cool-down');
  t.match(cooling[0], { to: 'p3', state: 'done' });
  t.ok((cooling[0]?.agoMs ?? Infinity) < 5_000, 'the cool-down runs from the commit');
  // The new owner's balancer hears of it through the source's gossip (once a second).
  let seen = false;
  for (let i = 0; i < 100 && !seen; i++) {
    seen = (await g.peer('p3').top(16)).recentMoves.some((m) => m.volumeId === info.volumeId && m.page === page && m.to === 'p3');
    if (!seen) await new Promise((r) => setTimeout(r, 100));
  }
  t.ok(seen, 'the new owner p3 sees the page cooling down');
});
