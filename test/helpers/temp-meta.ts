// An embedded catalog store in a fresh temporary folder, closed and removed by the test's teardown.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedMetaStore } from '../../src/cluster/embedded';

export async function tempMetaStore(t: { teardown(fn: () => unknown): void }, prefix: string): Promise<{ dir: string; meta: EmbeddedMetaStore }> {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  t.teardown(async () => {
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { dir, meta };
}
