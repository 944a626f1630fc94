// One compliance suite for every MetaStore backend (abstract-level style): the catalog and
// every peer rely on exactly these semantics.

import type { MetaStore, WatchEvent } from '../../src/cluster/metastore';
import { ConflictError } from '../../src/errors';

type Test = {
  test(name: string, fn: (t: Test) => Promise<void>): Promise<void>;
  equal(a: unknown, b: unknown, msg?: string): void;
  same(a: unknown, b: unknown, msg?: string): void;
  rejects(p: Promise<unknown>, expected: unknown, msg?: string): Promise<void>;
};

const until = async (cond: () => boolean, timeoutMs = 5000): Promise<boolean> => {
  const deadline = Date.now() + timeoutMs;
  while (!cond() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  return cond();
};

export function metaStoreSuite(t: Test, factory: () => Promise<MetaStore>): void {
  t.test('create, read, compare-and-swap, delete', async (t) => {
    const s = await factory();
    try {
      t.equal(await s.get('a/x'), undefined, 'absent');
      const r1 = await s.put('a/x', Buffer.from('one'), 0);
      t.equal(r1.version, 1);
      await t.rejects(s.put('a/x', Buffer.from('again'), 0), ConflictError, 'create only once');
      const r2 = await s.put('a/x', Buffer.from('two'), 1);
      t.equal(r2.version, 2);
      await t.rejects(s.put('a/x', Buffer.from('stale'), 1), ConflictError, 'stale version loses');
      const got = await s.get('a/x');
      t.same([got?.value.toString(), got?.version], ['two', 2]);
      await t.rejects(s.delete('a/x', 1), ConflictError, 'delete needs the current version');
      await s.delete('a/x', 2);
      t.equal(await s.get('a/x'), undefined, 'gone');
      t.equal((await s.put('a/x', Buffer.from('new'), 0)).version, 1, 'recreated from version 0');
    } finally {
      await s.close();
    }
  });

  t.test('list by prefix, in key order, nothing outside the prefix', async (t) => {
    const s = await factory();
    try {
      for (const k of ['v/b', 'v/a', 'v/c', 'vv/z', 'u/a']) await s.put(k, Buffer.from(k), 0);
      t.same((await s.list('v/')).map((r) => r.key), ['v/a', 'v/b', 'v/c']);
    } finally {
      await s.close();
    }
  });

  t.test('watch sees every later change under its prefix, in order', async (t) => {
    const s = await factory();
    try {
      const seen: string[] = [];
      const unwatch = await s.watch('w/', (ev: WatchEvent) => seen.push(ev.type === 'put' ? `put ${ev.record.key} v${ev.record.version}` : `delete ${ev.key}`));
      await s.put('w/1', Buffer.from('a'), 0);
      await s.put('other', Buffer.from('b'), 0);
      await s.put('w/1', Buffer.from('c'), 1);
      await s.delete('w/1', 2);
      await until(() => seen.length >= 3);
      t.same(seen, ['put w/1 v1', 'put w/1 v2', 'delete w/1']);
      unwatch();
      await s.put('w/2', Buffer.from('d'), 0);
      await new Promise((r) => setTimeout(r, 100));
      t.equal(seen.length, 3, 'nothing after unsubscribe');
    } finally {
      await s.close();
    }
  });

  t.test('concurrent compare-and-swap: exactly one writer wins each version', async (t) => {
    const s = await factory();
    try {
      await s.put('c/n', Buffer.from('0'), 0);
      const attempts = await Promise.allSettled(Array.from({ length: 10 }, (_, i) => s.put('c/n', Buffer.from(String(i)), 1)));
      t.equal(attempts.filter((a) => a.status === 'fulfilled').length, 1, 'one winner');
      t.equal((await s.get('c/n'))?.version, 2);
    } finally {
      await s.close();
    }
  });
}
