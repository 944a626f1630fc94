// Socket-level fuzzing of two peer processes (issue 15, acceptance 2): random and mutated
// iSCSI PDUs in every phase, Data-Out sequences with faults, mutated peer frames against the
// page service, raw HTTP requests (test/helpers/fuzz-cases.ts). After every case both peers
// are alive, each within `rssAboveIdleBytesMax` of its idle RSS; after every few, a
// well-behaved host on sessions of its own writes random blocks (on pages of both peers) and
// reads them back exactly. Seeded: prints "fuzz: N cases, seed S"; a failure prints the seed and case index
// that replay it. A peer that dies is restarted (at most `restartsMax` times) so that one
// crash does not hide what the rest of the run would find.
//
//   PEERSAN_FUZZ_SEED=S      the run's seed (default: random)
//   PEERSAN_FUZZ_CASE=i      replay case i of seed S alone
//   PEERSAN_FUZZ_CASES=N     run N cases (default: as many as fit in PEERSAN_FUZZ_MS)
//   PEERSAN_FUZZ_MS=ms       time for the cases (default 45000; with PEERSAN_FUZZ_CASES, none)
//   PEERSAN_TEST_LOG_DIR=dir keep each peer's log as dir/<id>.log (why a peer died)

import t from 'tap';
import { pickCase, type CaseContext, type Violation } from './helpers/fuzz-cases';
import { adminToken, alive, blockBytes, clusterSecret, mib, rssOf, startFuzzGroup } from './helpers/fuzz-group';
import { openSession, type RawIscsi } from './helpers/fuzz-iscsi';
import { caseSeed, Rng } from './helpers/fuzz-rng';

/** Memory a peer may gain over its idle RSS while fuzzed (the cases are small: this catches leaks). */
const rssAboveIdleBytesMax = 256 * 2 ** 20;
/** Cases between two health checks (a check costs a write and a read per portal). */
const casesPerCheck = 6;
const restartsMax = 3;
const volumeBytes = 64 * 2 ** 20;
const soloBytes = 32 * 2 ** 20;

const envInt = (name: string): number | undefined => (process.env[name] === undefined ? undefined : Number(process.env[name]));
const seed = envInt('PEERSAN_FUZZ_SEED') ?? Math.floor(Math.random() * 0x1_0000_0000);
const onlyCase = envInt('PEERSAN_FUZZ_CASE');
const casesMax = onlyCase !== undefined ? 1 : (envInt('PEERSAN_FUZZ_CASES') ?? Infinity);
const timeMs = envInt('PEERSAN_FUZZ_MS') ?? (process.env.PEERSAN_FUZZ_CASES ? Infinity : 45_000);

interface Failure extends Violation {
  index: number;
  kind: string;
}

t.test('fuzz: peers survive hostile iSCSI, peer frames and HTTP, and keep serving a normal host', async (t) => {
  const g = await startFuzzGroup((fn) => t.teardown(fn), 2, {
    good: { size: '64M' }, fuzz: { size: '64M' }, junk: { size: '16M' }, solo: { size: '32M', peers: 'p2' },
  });
  const idle = g.peers.map((p) => rssOf(p.process.pid!)!.rssBytes);
  // The normal host: one session per portal, so that its I/O is served locally and forwarded both ways.
  const host: RawIscsi[] = [];
  const openHost = async (): Promise<void> => {
    host.splice(0).forEach((c) => c.close());
    for (const p of g.peers) host.push(await openSession(p.iscsiPort, 'good'));
  };
  await openHost();
  let checker: RawIscsi | undefined;
  const ctx: CaseContext = {
    iscsiPorts: g.peers.map((p) => p.iscsiPort), rpcAddresses: g.peers.map((p) => `127.0.0.1:${p.rpcPort}`), peerIds: g.peers.map((p) => p.id),
    httpPorts: g.httpPorts, secret: clusterSecret, token: adminToken, blockBytes,
    fuzz: { name: 'fuzz', id: g.volumeIds.get('fuzz')!, blocks: volumeBytes / blockBytes }, junk: { name: 'junk' },
    solo: { id: g.volumeIds.get('solo')!, blocks: soloBytes / blockBytes, owner: 1 },
    checker: async () => {
      if (!checker || checker.closed) checker = await openSession(g.peers[1].iscsiPort, 'fuzz');
      return checker;
    },
  };
  t.teardown(() => [...host, checker].forEach((c) => c?.close()));

  const hostRng = new Rng(seed, 1);
  /** Cheap, after every case: each peer alive and within its memory bound. */
  const vitals = (): string[] => g.peers.flatMap((p, i) => {
    const rss = rssOf(p.process.pid!)?.rssBytes;
    if (!alive(p) || rss === undefined) return [`peer ${p.id} exited (${p.process.exitCode ?? p.process.signalCode ?? 'not reaped yet'})`];
    return rss - idle[i] > rssAboveIdleBytesMax ? [`peer ${p.id} RSS ${mib(rss)} MiB, ${mib(rss - idle[i])} MiB above idle (bound ${mib(rssAboveIdleBytesMax)})`] : [];
  });
  /** Every few cases: the normal host writes random blocks through each portal and reads them back. */
  const served = async (): Promise<string[]> => {
    const problems: string[] = [];
    for (const [i, c] of host.entries()) {
      const blocks = hostRng.pick([1, 8, 128]);
      const lba = hostRng.int(volumeBytes / blockBytes - blocks);
      const data = hostRng.bytes(blocks * blockBytes);
      const w = await c.writeBlocks(lba, data, blockBytes);
      const r = w?.status === 0 ? await c.readBlocks(lba, blocks, blockBytes) : undefined;
      if (w?.status !== 0 || r?.status !== 0 || !r.data.equals(data)) {
        problems.push(`normal host on ${g.peers[i].id}: write ${w ? `status ${w.status}` : 'no answer'}, read ${r ? `status ${r.status}${r.data.equals(data) ? '' : ', different bytes'}` : 'not done'} (lba ${lba}, ${blocks} blocks)`);
      }
    }
    return problems;
  };
  /** Start the peers that died again (fresh idle RSS, fresh host sessions); false once out of restarts. */
  let restarts = 0;
  const revive = async (): Promise<boolean> => {
    const dead = g.peers.filter((p) => !alive(p));
    if (dead.length === 0) return true;
    if ((restarts += dead.length) > restartsMax) return false;
    for (const p of dead) {
      await p.start();
      idle[g.peers.indexOf(p)] = rssOf(p.process.pid!)!.rssBytes;
    }
    checker?.close();
    await openHost();
    return true;
  };

  const failures: Failure[] = [];
  const counts = new Map<string, number>();
  const started = Date.now();
  let run = 0;
  let checked = true;
  let index = onlyCase ?? 0;
  for (; run < casesMax && Date.now() - started < timeMs; index++) {
    const rng = new Rng(caseSeed(seed, index));
    const [kind, fn] = pickCase(rng);
    counts.set(kind, (counts.get(kind) ?? 0) + 1);
    let violations: Violation[];
    try {
      violations = await fn(ctx, rng);
    } catch (err) {
      // A case that cannot even connect: the health check below says why.
      violations = [{ finding: 0, message: `case threw: ${(err as Error).message}` }];
    }
    for (const v of violations) failures.push({ index, kind, ...v });
    run++;
    const problems = vitals();
    for (const message of problems) failures.push({ index, kind, finding: 0, message: `after this case: ${message}` });
    if (problems.length > 0) {
      if (!(await revive())) break;
      continue;
    }
    checked = run % casesPerCheck === 0;
    if (!checked) continue;
    for (const message of await served()) failures.push({ index, kind, finding: 0, message: `after cases ${index + 1 - casesPerCheck}-${index}: ${message}` });
  }
  if (!checked) for (const message of await served()) failures.push({ index: index - 1, kind: 'end', finding: 0, message: `after the last cases: ${message}` });

  const rss = g.peers.map((p, i) => `${p.id} idle ${mib(idle[i])} MiB, now ${alive(p) ? mib(rssOf(p.process.pid!)!.rssBytes) : '-'} MiB`);
  t.comment(`fuzz: ${run} cases, seed ${seed} (${Math.round((Date.now() - started) / 1000)} s; ${[...counts].map(([k, n]) => `${k} ${n}`).join(', ')}; ${rss.join('; ')}; ${restarts} restarts)`);
  if (failures.length > 0) {
    const byItem = new Map<string, number>();
    for (const f of failures) byItem.set(f.finding ? `issue 15 item ${f.finding}` : 'other', (byItem.get(f.finding ? `issue 15 item ${f.finding}` : 'other') ?? 0) + 1);
    t.comment(`fuzz: ${failures.length} violations (${[...byItem].map(([k, n]) => `${k}: ${n}`).join(', ')}); the first ${Math.min(30, failures.length)}:`);
  }
  for (const f of failures.slice(0, 30)) {
    t.comment(`fuzz failure: case ${f.index} (${f.kind})${f.finding ? ` [issue 15 item ${f.finding}]` : ''}: ${f.message}; replay: PEERSAN_FUZZ_SEED=${seed} PEERSAN_FUZZ_CASE=${f.index} npx tap test/fuzz.test.ts`);
  }
  t.same(failures.map((f) => `case ${f.index} (${f.kind}): ${f.message}`), [], `no violations (seed ${seed}, ${run} cases)`);
});
