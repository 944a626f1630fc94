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
