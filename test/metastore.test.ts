import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedMetaStore } from '../src/cluster/embedded';
import { EtcdMetaStore } from '../src/cluster/etcd';
import { hasTool, startEtcd } from './helpers/processes';
import { metaStoreSuite } from './helpers/metastore-suite';

t.test('embedded (LevelDB)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-meta-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  let n = 0;
  metaStoreSuite(t, () => EmbeddedMetaStore.open(join(dir, `db${++n}`)));
});

t.test('etcd', { skip: hasTool('etcd') ? false : 'etcd not installed (.ci/run installs etcd-server)' }, async (t) => {
  const { endpoint } = await startEtcd((fn) => t.teardown(fn));
  let n = 0;
  // Each store gets its own namespace, so the suite's keys never meet.
  metaStoreSuite(t, async () => new EtcdMetaStore({ endpoints: [endpoint], namespace: `/peersan-test/${++n}/` }));
});
