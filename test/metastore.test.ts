import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedMetaStore } from '../src/cluster/embedded';
import { EtcdMetaStore } from '../src/cluster/etcd';
import { freePort, hasTool, waitForPort } from './helpers/processes';
import { metaStoreSuite } from './helpers/metastore-suite';

t.test('embedded (LevelDB)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-meta-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  let n = 0;
  metaStoreSuite(t, () => EmbeddedMetaStore.open(join(dir, `db${++n}`)));
});

t.test('etcd', { skip: hasTool('etcd') ? false : 'etcd not installed (.ci/run installs etcd-server)' }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-etcd-'));
  const [client, peer] = [await freePort(), await freePort()];
  const etcd = spawn('etcd', [
    '--name', 'test', '--data-dir', join(dir, 'data'),
    '--listen-client-urls', `http://127.0.0.1:${client}`, '--advertise-client-urls', `http://127.0.0.1:${client}`,
    '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
    '--initial-cluster', `test=http://127.0.0.1:${peer}`, '--log-level', 'error',
  ], { stdio: 'ignore' });
  t.teardown(async () => {
    etcd.kill('SIGKILL');
    await new Promise((r) => etcd.once('exit', r));
    rmSync(dir, { recursive: true, force: true });
  });
  await waitForPort(client);
  let n = 0;
  // Each store gets its own namespace, so the suite's keys never meet.
  metaStoreSuite(t, async () => new EtcdMetaStore({ endpoints: [`http://127.0.0.1:${client}`], namespace: `/peersan-test/${++n}/` }));
});
