// A rolling restart of every peer of a group on etcd (issue 18, acceptance 3), short: the bench
// bench/rolling-restart.js with a small volume and one session per portal, under its verifying
// host load. Judged here: no lost write, no host error on a session whose portal stayed up, every
// step healthy again. The pause is printed (its aim, 500 ms, is the bench's: a timed figure on a
// shared CI machine is no test).

import t from 'tap';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { repoRoot } from './helpers/processes';
import { replicatedTestSkip } from './helpers/replicas';

const skip = replicatedTestSkip(['etcd']);

t.test('rolling restart of three peers under a verifying host load: nothing lost, no host error', { skip }, async (t) => {
  const out = await new Promise<{ code: number | null; text: string }>((resolve) => {
    execFile(process.execPath, [join(repoRoot, 'bench', 'rolling-restart.js'), '--size-mib', '64', '--sessions', '1', '--minutes', '8'], { timeout: 600_000, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, text: `${stdout}${stderr}` }));
  });
  for (const line of out.text.trim().split('\n')) t.comment(line);
  const m = /(\d+) graceful restarts, (\d+) acknowledged writes: (\d+) lost, (\d+) host errors/.exec(out.text);
  t.ok(m, 'the bench reported');
  if (!m) return;
  t.equal(Number(m[1]), 3, 'every peer restarted and healthy again');
  t.ok(Number(m[2]) > 0, `${m[2]} writes acknowledged during the restarts`);
  t.equal(Number(m[3]), 0, 'no acknowledged write lost');
  t.equal(Number(m[4]), 0, 'no host error on a session whose portal stayed up');
});
