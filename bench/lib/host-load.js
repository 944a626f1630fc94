// The verifying host load of the soaks (failover-soak.js, rolling-restart.js): sessions of the
// test suite's raw initiator through each peer's portal, each writing 4 KiB blocks one at a time
// at random slots of its own, every block saying which write it is (test/helpers/replicas.ts);
// which peers are up (a failure on a session to a process since stopped does not count); the
// longest gap between completions (the pause a host saw).
'use strict';

const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { openSession } = require('../../test/helpers/fuzz-iscsi.ts');
const { cliPath, hasTool, startEtcd, startPeers } = require('../../test/helpers/processes.ts');
const { Ledger, replicasMissing, verifiedWrite, verifyLedger } = require('../../test/helpers/replicas.ts');
const { cleanup: groupCleanup } = require('./group');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Whether each peer's process is up, and a generation per peer bumped at each kill: a write
 * that failed while its peer's generation stayed the same failed on a live peer.
 */
class Liveness {
  constructor(peers) {
    this.up = new Map(peers.map((p) => [p.id, true]));
    this.generation = new Map(peers.map((p) => [p.id, 0]));
    this.waiters = [];
  }

  down(id) {
    this.up.set(id, false);
    this.generation.set(id, this.generation.get(id) + 1);
  }

  back(id) {
    this.up.set(id, true);
    for (const w of this.waiters.splice(0)) w();
  }

  /** Resolves when `id` is up (at once if it is), or when `stopped()` says to give up. */
  async whenUp(id, stopped) {
    while (!this.up.get(id) && !stopped()) await new Promise((r) => this.waiters.push(r));
  }

  wake() {
    for (const w of this.waiters.splice(0)) w();
  }
}

/**
 * One session of the host through `peer`, writing its own slots (slot ≡ index mod writers) of
 * `volume` until stopped; a write not GOOD within `timeoutMs` through a live peer is an error. Its completions (ms, monotonic) give the pauses; its ledger the lost writes.
 */
function startWriter({ peer, index, writers, slots, live, errors, loginFailures, volume, geometry, timeoutMs }) {
  const ledger = new Ledger(index + 1);
  const completions = [];
  let stopping = false;
  let seq = 0;
  const stopped = () => stopping;
  const pickSlot = () => {
    for (;;) {
      // Whole rows of `writers` slots only: a last partial row would put some writers past the end.
      const slot = Math.floor(Math.random() * Math.floor(slots / writers)) * writers + index;
      if (ledger.usable(slot)) return slot;
    }
  };
  const loop = (async () => {
    let c;
    let loggedInMs = 0;
    /** The peer's generation when the session logged in: a session to a process since killed is not a live peer's. */
    let generation;
    while (!stopping) {
      await live.whenUp(peer.id, stopped);
      if (stopping) break;
      // A writer that finished a write just as its peer was killed waited here holding a session to the dead process.
      if (c && live.generation.get(peer.id) !== generation) {
        c.close();
        c = undefined;
      }
      if (!c) {
        generation = live.generation.get(peer.id);
        c = await openSession(peer.iscsiPort, volume).catch((err) => {
          if (live.generation.get(peer.id) === generation && live.up.get(peer.id)) loginFailures.push({ at: Date.now(), peer: peer.id, writer: index, what: `login: ${err.message}` });
          return undefined;
        });
        if (!c) {
          await sleep(500);
          continue;
        }
        loggedInMs = performance.now();
      }
      let why = '';
      const startedMs = performance.now();
      const ok = await verifiedWrite(c, ledger, pickSlot(), ++seq, geometry, timeoutMs, (w) => (why = w));
      if (ok) {
        completions.push(performance.now());
        continue;
      }
      if (live.generation.get(peer.id) === generation) errors.push({ at: Date.now(), atMs: performance.now(), peer: peer.id, writer: index, what: `write ${seq} (sent at +${Math.round(startedMs - loggedInMs)} ms of its session): ${why}` });
      c.close();
      c = undefined;
    }
    c?.close();
  })();
  return {
    peer, ledger, completions,
    async stop() {
      stopping = true;
      live.wake();
      await loop;
    },
  };
}

/** The longest gap between completions of one writer, from its last completion before `fromMs` to `toMs`. */
function longestGap(completions, fromMs, toMs) {
  return longestGapAt(completions, fromMs, toMs).gapMs;
}

/** The longest gap as longestGap finds it, and when it began (the completion before it). */
function longestGapAt(completions, fromMs, toMs) {
  let last = completions.filter((t) => t <= fromMs).pop() ?? fromMs;
  let gap = { gapMs: 0, fromMs: last };
  for (const t of completions) {
    if (t <= last) continue;
    if (t > toMs) break;
    if (t - last > gap.gapMs) gap = { gapMs: t - last, fromMs: last };
    last = t;
  }
  return toMs - last > gap.gapMs ? { gapMs: toMs - last, fromMs: last } : gap;
}

/** Blocks of 4 KiB, as a database's pages. */
const geometry = { slotBytes: 4096, blockBytes: 512 };

/**
 * A soak's group and load: etcd and `count` peer processes (`yaml`: their cluster.yaml
 * additions), one volume of `sizeMib` with `replicas` copies, and `sessions` verifying writers
 * through every portal. With `tls`, the group has `cluster.tls` (certificates made by
 * `peersan init`, as for a real group): peer calls and block data streams run over mutual TLS.
 * Everything started is stopped by `soak.teardown()`.
 */
async function startSoak({ volume, count, sizeMib, replicas, sessions, timeoutS, yaml, tls = false, teardowns }) {
  const missing = ['etcd'].filter((x) => !hasTool(x));
  if (missing.length) throw new Error(`missing ${missing.join(', ')}`);
  const noReplicas = replicasMissing();
  if (noReplicas) throw new Error(`${noReplicas}: this soak needs replicated volumes`);
  const { endpoint } = await startEtcd((fn) => teardowns.push(fn));
  const clusterYaml = [...(yaml.clusterYaml ?? []), ...(tls ? groupTls(count, teardowns) : [])];
  const peers = await startPeers((fn) => teardowns.push(fn), { count, etcd: endpoint, ...yaml, clusterYaml });
  const created = await peers[0].cliAsync('volume', 'create', volume, '--size', `${sizeMib}M`, '--replicas', String(replicas));
  if (created.status !== 0) throw new Error(`volume create: ${created.out.trim()}`);
  const live = new Liveness(peers);
  const errors = [];
  const loginFailures = [];
  const slots = (sizeMib * 1024 * 1024) / geometry.slotBytes;
  const writersCount = peers.length * sessions;
  const writers = peers.flatMap((p, i) => Array.from({ length: sessions }, (_, k) =>
    startWriter({ peer: p, index: i * sessions + k, writers: writersCount, slots, live, errors, loginFailures, volume, geometry, timeoutMs: timeoutS * 1000 })));
  const livePeers = () => peers.filter((p) => live.up.get(p.id));
  return {
    peers, live, livePeers, errors, loginFailures, writers,
    /** Stop the writers and read every slot back: how many writes were acknowledged, and the lost ones. */
    async finish() {
      for (const w of writers) await w.stop();
      const acknowledged = writers.reduce((a, w) => a + w.completions.length, 0);
      const lost = [];
      for (const w of writers) lost.push(...(await verifyLedger(livePeers()[0].iscsiPort, volume, w.ledger, geometry)));
      return { acknowledged, lost };
    },
  };
}

/** A CA and certificates for peers p1…p`count` (`peersan init`); the `cluster.tls` line naming them. */
function groupTls(count, teardowns) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'peersan-soak-tls-'));
  teardowns.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  const ids = Array.from({ length: count }, (_, i) => `p${i + 1}`);
  const made = spawnSync(process.execPath, [cliPath, 'init', '--dir', dir, '--peers', ids.join(',')], { encoding: 'utf8', timeout: 60_000 });
  if (made.status !== 0) throw new Error(`peersan init: ${made.stderr.trim() || made.stdout.trim()}`);
  const tlsDir = path.join(dir, 'tls');
  return [`tls: { ca: "${tlsDir}/ca.crt", cert: "${tlsDir}/{peer}.crt", key: "${tlsDir}/{peer}.key" }`];
}

/** Run a soak's `main(teardowns)`: its teardowns run once, at the end or on Ctrl-C; a failure is one line and exit 1. */
function runSoak(what, main) {
  const teardowns = [];
  let tornDown;
  const teardown = () => {
    tornDown ??= (async () => {
      for (const fn of teardowns.reverse()) await Promise.resolve().then(fn).catch(() => undefined);
      groupCleanup();
    })();
    return tornDown;
  };
  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => void teardown().finally(() => process.exit(130)));
  main(teardowns)
    .catch((err) => {
      console.error(`${what} failed: ${err.message}`);
      process.exitCode = 1;
    })
    .finally(teardown);
}

module.exports = { Liveness, startWriter, longestGap, longestGapAt, startSoak, runSoak };
