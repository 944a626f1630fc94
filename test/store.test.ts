import t from 'tap';
import fc from 'fast-check';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PageStore } from '../src/store/page-store';
import { MemoryBackend } from './helpers/memory-backend';

const volumeId = '00000000000000ab';

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-store-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

t.test('unwritten reads zero; writes across grain and page boundaries read back', async (t) => {
  const store = await PageStore.open(tempDir(t));
  t.teardown(() => store.close());
  const v = await store.openVolume(volumeId, { blockBytes: 512, blockCount: 3 * 8192 });
  t.same(await v.read(100, 3), Buffer.alloc(1536));
  const data = Buffer.alloc(512 * 300);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
  await v.write(8192 - 150, data); // spans the page boundary and several grains
  t.same(await v.read(8192 - 150, 300), data);
  t.same(await v.read(8192 - 151, 1), Buffer.alloc(512), 'block before untouched');
  t.equal(v.allocatedBytes(), 4 * 64 * 1024, 'four grains allocated');
});

t.test('unmap frees whole grains, zeros partial ones, reports status, never leaks old data', async (t) => {
  const store = await PageStore.open(tempDir(t));
  t.teardown(() => store.close());
  const v = await store.openVolume(volumeId, { blockBytes: 512, blockCount: 8192 });
  await v.write(0, Buffer.alloc(512 * 512, 0xee)); // four grains
  await v.unmap(100, 300); // grain 1 (128..255) whole, grain 2 whole? 100..399: partial 0, whole 1 and 2, partial 3
  t.same(await v.read(100, 300), Buffer.alloc(512 * 300), 'reads zero');
  t.equal((await v.read(99, 1))[0], 0xee);
  t.equal((await v.read(400, 1))[0], 0xee);
  const extents = await v.lbaStatus(0, 512);
  t.same(extents.map((e) => [e.lba, e.blocks, e.mapped]), [[0, 128, true], [128, 256, false], [384, 128, true]]);
  // The freed slots are reused by a new grain: it must read zeros where it was not written.
  await v.write(4096, Buffer.alloc(512, 0x11));
  const fresh = await v.read(4096, 128);
  t.equal(fresh[0], 0x11);
  t.same(fresh.subarray(512), Buffer.alloc(127 * 512), 'no old bytes in a reused slot');
});

t.test('compare-and-write is atomic against concurrent writers', async (t) => {
  const store = await PageStore.open(tempDir(t));
  t.teardown(() => store.close());
  const v = await store.openVolume(volumeId, { blockBytes: 512, blockCount: 8192 });
  await v.write(0, Buffer.alloc(512, 0));
  // 50 CAWs each increment a counter in block 0 from its last seen value; concurrent writes elsewhere.
  let successes = 0;
  const workers = Array.from({ length: 8 }, async (_, w) => {
    for (let i = 0; i < 25; i++) {
      const cur = await v.read(0, 1);
      const next = Buffer.from(cur);
      next.writeUInt32BE(cur.readUInt32BE(0) + 1, 0);
      const r = await v.compareAndWrite(0, cur, next);
      if (r.ok) successes++;
      await v.write(1 + w, Buffer.alloc(512, i));
    }
  });
  await Promise.all(workers);
  t.equal((await v.read(0, 1)).readUInt32BE(0), successes, 'every successful CAW counted exactly once');
});

t.test('random operations agree with the in-memory model (and survive reopen)', async (t) => {
  const dir = tempDir(t);
  const blockCount = 2048;
  const op = fc.oneof(
    fc.record({ kind: fc.constant('write' as const), lba: fc.integer({ min: 0, max: blockCount - 1 }), blocks: fc.integer({ min: 1, max: 300 }), byte: fc.integer({ min: 1, max: 255 }) }),
    fc.record({ kind: fc.constant('unmap' as const), lba: fc.integer({ min: 0, max: blockCount - 1 }), blocks: fc.integer({ min: 1, max: 600 }), byte: fc.constant(0) }),
  );
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(op, { maxLength: 25 }), async (ops) => {
      const id = (++run).toString(16).padStart(16, '0');
      const store = await PageStore.open(dir);
      const model = new MemoryBackend(512, blockCount);
      const v = await store.openVolume(id, { blockBytes: 512, blockCount });
      for (const o of ops) {
        const blocks = Math.min(o.blocks, blockCount - o.lba);
        if (o.kind === 'write') {
          const data = Buffer.alloc(blocks * 512, o.byte);
          await Promise.all([v.write(o.lba, data), model.write(o.lba, data)]);
        } else {
          await Promise.all([v.unmap(o.lba, blocks), model.unmap(o.lba, blocks)]);
        }
      }
      await store.close();
      const reopened = await PageStore.open(dir);
      const again = await reopened.openVolume(id, { blockBytes: 512, blockCount });
      const same = (await again.read(0, blockCount)).equals(model.data);
      await reopened.deleteVolume(id);
      await reopened.close();
      return same;
    }),
    { numRuns: 40 },
  );
  t.pass('40 random histories');
});

t.test('deleteVolume removes its data file', async (t) => {
  const dir = tempDir(t);
  const store = await PageStore.open(dir);
  t.teardown(() => store.close());
  const v = await store.openVolume(volumeId, { blockBytes: 4096, blockCount: 8192 * 2 });
  await v.write(8192, Buffer.alloc(4096 * 4, 1));
  t.ok(statSync(join(dir, `vol-${volumeId}.dat`)).size > 0);
  await store.deleteVolume(volumeId);
  t.notOk(existsSync(join(dir, `vol-${volumeId}.dat`)));
});

t.test('kill -9 after flush: every flushed write is there', async (t) => {
  const dir = tempDir(t);
  // The child writes 200 random-offset blocks, flushes, prints "flushed", then waits to be killed.
  const child = spawn(process.execPath, ['-e', `
    const { PageStore } = require(${JSON.stringify(join(__dirname, '..', 'dist', 'store', 'page-store.js'))});
    (async () => {
      const s = await PageStore.open(${JSON.stringify(dir)});
      const v = await s.openVolume('${volumeId}', { blockBytes: 512, blockCount: 65536 });
      for (let i = 0; i < 200; i++) {
        const b = Buffer.alloc(512, (i % 250) + 1);
        b.writeUInt32BE(i, 0);
        await v.write((i * 7919) % 65536, b);
      }
      await v.flush();
      process.stdout.write('flushed\\n');
      for (let i = 200; i < 400; i++) v.write((i * 7919) % 65536, Buffer.alloc(512, 9)); // unsynced, may or may not land
      setInterval(() => {}, 1000);
    })();
  `]);
  const ready = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 20_000);
    child.stdout.on('data', (d: Buffer) => {
      if (d.toString().includes('flushed')) {
        clearTimeout(timer);
        resolve(true);
      }
    });
  });
  child.kill('SIGKILL');
  await new Promise((r) => child.on('exit', r));
  t.ok(ready, 'child flushed');
  const store = await PageStore.open(dir);
  t.teardown(() => store.close());
  t.equal(store.wasClean, false, 'the store knows it was not shut down cleanly');
  const v = await store.openVolume(volumeId, { blockBytes: 512, blockCount: 65536 });
  let intact = 0;
  for (let i = 0; i < 200; i++) {
    const b = await v.read((i * 7919) % 65536, 1);
    const overwritten = b[4] === 9;
    if (overwritten || (b.readUInt32BE(0) === i && b[4] === (i % 250) + 1)) intact++;
  }
  t.equal(intact, 200, 'all 200 flushed blocks (or their later overwrites) read back');
});
