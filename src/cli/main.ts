// The `peersan` command: admin client (status, volume …), `peer` (run one peer) and `demo`
// (a throwaway group in one process). Human tables by default, --json for scripts; on error
// one clear line and a non-zero exit (PEERSAN_DEBUG=1 shows the stack).

import { existsSync } from 'node:fs';
import { Command, Option } from 'commander';
import { defaultReplicas, formatBytes, replicasMax } from '../cluster/catalog';
import { protectionText, summaryText } from '../replication/protection';
import { InvalidArgumentError, PeersanError } from '../errors';
import type { MoveInfo } from '../migration/migrator';
import { AdminClient, type PageMapView, type PageRange, type VolumeView } from '../server/admin';
import { loadConfig } from '../server/config';
import type { DemoOptions } from './serve';
import { pageNumber, wholeNumber } from '../server/admin-input';
import { pageMapPagesMax } from '../limits';
import { parseCount } from './args';
import { addLoadCommands, fillHead, fillText } from './load';
import { addPeerCommands } from './peer-commands';
import { adminTlsChannel, loadCa } from '../cluster/peer-tls';
import { addInitCommand, clusterCaPath, withTlsHint } from './tls-commands';

interface GlobalOptions {
  peer?: string;
  config?: string;
  token?: string;
  ca?: string;
  json?: boolean;
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).join('\n');
}

function configPath(g: GlobalOptions): string | undefined {
  if (g.config) return g.config;
  if (process.env.PEERSAN_CONFIG) return process.env.PEERSAN_CONFIG;
  return existsSync('cluster.yaml') ? 'cluster.yaml' : undefined;
}

/** How the CLI reaches the group: the peers it may ask, and how to make a client for one. */
function adminTarget(g: GlobalOptions): { addresses: string[]; connect(address: string): AdminClient; ca: string | undefined } {
  const path = configPath(g);
  const config = path ? loadConfig(path) : undefined;
  // --peer picks one; else any peer of the config that answers (the first may be down).
  const addresses = g.peer ? [g.peer] : config ? config.peers.map((p) => p.rpc) : ['127.0.0.1:7001'];
  const token = g.token ?? process.env.PEERSAN_TOKEN ?? config?.adminToken;
  if (!token) throw new InvalidArgumentError('no admin token: pass --token, set $PEERSAN_TOKEN, or point --config/$PEERSAN_CONFIG at cluster.yaml');
  const ca = clusterCaPath(g, config);
  const tls = ca ? adminTlsChannel(loadCa(ca)) : undefined;
  return { addresses, connect: (address) => new AdminClient(address, token, tls), ca };
}

/** How long the CLI waits for a connection to one of several listed peers. */
const anyPeerReadyMs = 5_000;

/**
 * The first of the listed peers whose channel connects; when none does, the first one (its
 * call then fails with the usual one line, TLS hint included).
 */
async function anyPeer(addresses: readonly string[], connect: (address: string) => AdminClient): Promise<AdminClient> {
  if (addresses.length === 1) return connect(addresses[0]);
  const clients = addresses.map(connect);
  const ready = await Promise.any(clients.map(async (c) => (await c.ready(anyPeerReadyMs), c))).catch(() => clients[0]);
  for (const c of clients) if (c !== ready) c.close();
  return ready;
}

async function withClient<T>(g: GlobalOptions, fn: (c: AdminClient, connect: (address: string) => AdminClient) => Promise<T>): Promise<T> {
  const { addresses, connect, ca } = adminTarget(g);
  const client = await anyPeer(addresses, connect);
  try {
    return await fn(client, connect);
  } catch (err) {
    throw withTlsHint(err, ca);
  } finally {
    client.close();
  }
}

function out(g: GlobalOptions, data: unknown, human: () => string): void {
  process.stdout.write((g.json ? JSON.stringify(data, null, 2) : human()) + '\n');
}

function volumeRows(vs: VolumeView[]): string {
  if (vs.length === 0) return 'no volumes';
  return table([
    ['NAME', 'SIZE', 'BLOCK', 'USED', 'COPIES', 'PROTECTION', 'SESSIONS', 'ACCESS', 'TARGET'],
    ...vs.map((v) => [
      v.name, formatBytes(v.sizeBytes), String(v.blockBytes), formatBytes(v.allocatedBytes), String(v.replicas), v.protection ?? '-', String(v.sessions),
      (v.allow.length ? `${v.allow.length} initiator(s)` : 'any initiator') + (v.chapEnabled ? (v.mutualChap ? ', mutual CHAP' : ', CHAP') : ''),
      v.targetName,
    ]),
  ]);
}

function volumeDetail(v: VolumeView): string {
  // "key: value" lines, as the operator greps them (`protection: healthy`).
  return fields([
    ['name', v.name],
    ['target', v.targetName],
    ['id', v.id],
    ['size', `${formatBytes(v.sizeBytes)} (${v.sizeBytes} bytes, ${v.sizeBytes / v.blockBytes} blocks of ${v.blockBytes})`],
    ['allocated', `${formatBytes(v.allocatedBytes)} on the peer asked`],
    ['placed on', v.peers.join(', ')],
    ['copies', `${v.replicas} per page`],
    ...(v.protectionDetail ? [['protection', protectionText(v.protectionDetail)]] : []),
    ['allowed initiators', v.allow.length ? v.allow.join(', ') : 'any'],
    ['CHAP', v.chapEnabled ? `user ${v.chapUser}${v.mutualChap ? ', mutual' : ''}` : 'off'],
    ['sessions', String(v.sessions)],
    ['created', new Date(v.createdAtMs).toISOString()],
  ]);
}

function fields(rows: string[][]): string {
  return rows.map(([k, v]) => `${k}: ${v}`).join('\n');
}

/** A page's copies as one cell: primary first, stale copies marked (resyncing). */
function copiesCell(p: PageMapView['pages'][number]): string {
  const copies = p.copies && p.copies.length > 0 ? p.copies : [p.owner];
  const inSync = p.inSync && p.inSync.length > 0 ? p.inSync : copies;
  return copies.map((c) => (inSync.includes(c) ? c : `${c}(stale)`)).join(',');
}

/** Runs of consecutive pages of the detail with the same copies and version, one table row each. */
function pageRuns(pages: PageMapView['pages']): string[][] {
  const runs: string[][] = [];
  for (let i = 0; i < pages.length; ) {
    let j = i;
    while (j + 1 < pages.length && copiesCell(pages[j + 1]) === copiesCell(pages[i]) && pages[j + 1].version === pages[i].version) j++;
    runs.push([i === j ? String(pages[i].page) : `${pages[i].page}-${pages[j].page}`, pages[i].owner, copiesCell(pages[i]), `v${pages[i].version}`]);
    i = j + 1;
  }
  return runs;
}

/** Rows of runs the default view shows; a striped volume has one run per page, so past this the summary stands alone. */
const pageMapRunsShown = 24;

/**
 * The page map for people, bounded whatever the volume's size: the placement rule once, pages
 * per peer, the pages whose route changed (the lowest few), then the runs of the detail range
 * when a range was asked (`ranged`) or when they are few.
 */
export function pageMapText(m: PageMapView, ranged = false): string {
  const rule = m.peers.length > 1 ? `striped over ${m.peers.join(', ')} in turn (page 0's primary on ${m.peers[0]}, page 1's on ${m.peers[1]}, …)` : `all on ${m.peers[0]}`;
  const lines = [
    `volume ${m.volume}: ${m.totalPages} pages of ${m.pageBlocks} blocks, ${rule}, ${m.replicas} ${m.replicas === 1 ? 'copy' : 'copies'} per page`,
    `pages per peer: ${[...m.perPeer].sort((a, b) => a.peer.localeCompare(b.peer)).filter((p) => p.primaries > 0).map((p) => `${p.peer} ${p.primaries}`).join(', ')}`,
  ];
  if (m.replicas > 1) lines.push(`copies per peer: ${[...m.perPeer].sort((a, b) => a.peer.localeCompare(b.peer)).map((p) => `${p.peer} ${p.copies}`).join(', ')}`);
  if (m.changedPages > 0) {
    const more = m.changedPages - m.changed.length;
    lines.push(`changed since placement: ${m.changedPages} pages: ${m.changed.map((p) => `${p.page}→${copiesCell(p)} v${p.version}`).join(', ')}${more > 0 ? `, and ${more} more (use --from/--count)` : ''}`);
  }
  const runs = pageRuns(m.pages);
  const last = m.from + m.pages.length - 1;
  if (ranged || runs.length <= pageMapRunsShown) {
    if (m.next !== undefined || m.from > 0) lines.push(`pages ${m.from}-${last}${m.next !== undefined ? ` (next: --from ${m.next})` : ''}:`);
    lines.push(table([['PAGES', 'OWNER', 'COPIES', 'VERSION'], ...runs]));
  } else {
    lines.push(`detail of pages: peersan page map ${m.volume} --from N --count M (at most ${pageMapPagesMax} pages)`);
  }
  return lines.join('\n');
}

function moveProgress(m: MoveInfo): string {
  const width = 24;
  const filled = m.pieces === 0 ? width : Math.round((m.done / m.pieces) * width);
  const note = m.lastError ? `  (retrying: ${m.lastError})` : m.state === 'copying' ? '' : `  ${m.state}`;
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${m.done}/${m.pieces} pieces, ${formatBytes(m.bytesCopied)} copied${note}`;
}

function migrationsText(r: { moves: MoveInfo[]; unreachable: string[] }): string {
  const lines = r.moves.length === 0 ? ['no page moves in flight'] : [
    table([
      ['VOLUME', 'PAGE', 'FROM', 'TO', 'STATE', 'ELAPSED', 'PROGRESS'],
      ...r.moves.map((m) => [m.volume, String(m.page), m.from, m.to, m.state, `${Math.round((Date.now() - m.startedAtMs) / 1000)}s`, moveProgress(m)]),
    ]),
  ];
  if (r.unreachable.length > 0) lines.push(`not answering (their moves are not listed): ${r.unreachable.join(', ')}`);
  return lines.join('\n');
}

/** What following a move needs of the AdminClient. */
export interface MoveWatch {
  migrations(): Promise<{ moves: MoveInfo[]; unreachable: string[] }>;
  pageMap(name: string, range?: PageRange): Promise<PageMapView>;
}

export interface FollowOptions {
  /** Give up waiting (not the move) after this long. */
  timeoutMs: number;
  pollMs?: number;
  /** A change of state for the person watching (paused, resumed). */
  say(line: string): void;
  /** Progress of the move while it copies. */
  progress(m: MoveInfo): void;
}

type Seen =
  | { kind: 'moving'; move: MoveInfo }
  | { kind: 'committed' }
  | { kind: 'paused'; why: string }
  | { kind: 'gone'; owner: string };

/** One look at the move: listed by its source, committed, paused (its source or the peer asked is down) or gone. */
async function lookAtMove(c: MoveWatch, volume: string, page: number, from: string, to: string): Promise<Seen> {
  try {
    const { moves, unreachable } = await c.migrations();
    const move = moves.find((x) => x.volume === volume && x.page === page);
    if (move) return { kind: 'moving', move };
    const owner = (await c.pageMap(volume, { from: page, count: 1 })).pages[0]?.owner ?? '';
    if (owner === to) return { kind: 'committed' };
    if (unreachable.includes(from)) return { kind: 'paused', why: `source ${from} is down; the move resumes when it returns` };
    return { kind: 'gone', owner };
  } catch (err) {
    if (err instanceof PeersanError && err.code === 'PEERSAN_ERR_UNREACHABLE') return { kind: 'paused', why: `${err.message}; waiting for it` };
    throw err;
  }
}

/** Polls in a row that must find a move neither listed nor committed, its source up, before it counts as ended. */
const goneConfirmPolls = 4;

/**
 * Follow a move to its real end. A source that dies mid-move resumes it from its checkpoint
 * when it returns and commits it, so while the source is down the move is paused, not
 * failed: say so and keep waiting. A move that is gone while its source answers was
 * cancelled or stopped; it counts as such only after several looks, because the page map can
 * lag a commit and a restarted source can be between recovering its moves and answering.
 * Resolves on commit; rejects when the move ended otherwise, or at the deadline (saying
 * whether the move is paused or still copying: it goes on either way).
 */
export async function followMove(c: MoveWatch, volume: string, page: number, from: string, to: string, o: FollowOptions): Promise<void> {
  const deadlineMs = Date.now() + o.timeoutMs;
  let last: Seen | undefined;
  let gone = 0;
  for (;;) {
    const seen = await lookAtMove(c, volume, page, from, to);
    if (seen.kind === 'committed') return;
    if (seen.kind === 'gone') {
      if (++gone >= goneConfirmPolls) throw new PeersanError(`the move of page ${page} of ${volume} ended without completing: the page stays on ${seen.owner} (cancelled, or stopped: see \`peersan migrations\` and ${from}'s log)`);
    } else {
      gone = 0;
      tell(o, last, seen);
      last = seen;
    }
    if (Date.now() >= deadlineMs) throw stillGoing(volume, page, last, o.timeoutMs);
    await new Promise((r) => setTimeout(r, o.pollMs ?? 250));
  }
}

/** What changed since the last look, for the person watching: a pause (once per reason), its end, progress. */
function tell(o: FollowOptions, last: Seen | undefined, seen: Seen): void {
  const wasPaused = last?.kind === 'paused' ? last.why : '';
  if (seen.kind === 'paused' && seen.why !== wasPaused) o.say(`paused: ${seen.why}`);
  if (seen.kind === 'moving') {
    if (wasPaused) o.say('resumed');
    o.progress(seen.move);
  }
}

function stillGoing(volume: string, page: number, last: Seen | undefined, timeoutMs: number): PeersanError {
  const waited = `stopped waiting after ${Math.round(timeoutMs / 1000)} s: follow it with \`peersan migrations\``;
  if (last?.kind === 'paused') return new PeersanError(`the move of page ${page} of ${volume} is paused, not failed (${last.why}); ${waited}`, 'PEERSAN_ERR_PAUSED');
  const at = last?.kind === 'moving' ? ` (${last.move.done}/${last.move.pieces} pieces)` : '';
  return new PeersanError(`the move of page ${page} of ${volume} is still in progress${at}; ${waited}`, 'PEERSAN_ERR_IN_PROGRESS');
}

/** The --wait output: a bar rewritten in place on a terminal, a line per piece otherwise. */
function moveDisplay(): Pick<FollowOptions, 'say' | 'progress'> & { done(): void } {
  const tty = process.stdout.isTTY === true;
  let lastShown = -1;
  return {
    say: (line) => process.stdout.write(`${tty ? '\r\x1b[K' : ''}${line}\n`),
    progress: (m) => {
      if (tty) process.stdout.write(`\r${moveProgress(m)}\x1b[K`);
      else if (m.done !== lastShown) process.stdout.write(`${moveProgress(m)}\n`);
      lastShown = m.done;
    },
    done: () => {
      if (tty) process.stdout.write('\r\x1b[K');
    },
  };
}

const collect = (value: string, previous: string[]): string[] => [...previous, value];

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('peersan')
    .description('peersan: a SAN of equal peers (iSCSI target, page routing, live migration, consistent snapshots)')
    .option('--peer <host:port>', "a peer's RPC address (default: any peer of the config that answers, else 127.0.0.1:7001)")
    .option('--config <file>', 'cluster.yaml (default: $PEERSAN_CONFIG, else ./cluster.yaml)')
    .option('--token <token>', 'admin token (default: $PEERSAN_TOKEN, else the config file)')
    .option('--ca <file>', "the cluster CA, for a group with TLS (default: $PEERSAN_CA, else the config's cluster.tls.ca)")
    .option('--json', 'machine-readable output')
    .showHelpAfterError()
    .configureOutput({ outputError: (str, write) => write(str) });

  const g = (): GlobalOptions => program.opts<GlobalOptions>();

  program.command('status').description('peers, their addresses, capacity and sessions').action(async () => {
    const s = await withClient(g(), (c) => c.status());
    const fills = new Map((s.fills ?? []).map((f) => [f.id, f]));
    out(g(), s, () =>
      [
        `cluster ${s.cluster}`,
        table([
          ['PEER', 'STATE', 'ISCSI', 'RPC', 'VOLUMES', 'SESSIONS', 'USED', 'FREE', 'UPTIME', 'CAPACITY', fillHead],
          ...s.peers.map((p) => [
            p.id, peerState(p), p.iscsi, p.rpc, String(p.volumes), String(p.sessions.filter((x) => x.sessionType === 'Normal').length),
            formatBytes(p.allocatedBytes), formatBytes(p.freeBytes), `${Math.round(p.uptimeMs / 1000)}s`, String(fills.get(p.id)?.capacity ?? '-'), fillText(fills.get(p.id)),
          ]),
        ]),
        ...s.peers.flatMap((p) => p.sessions.filter((x) => x.sessionType === 'Normal').map((x) => `  ${p.id}: ${x.initiatorName} → ${x.targetName} from ${x.remoteAddress} (${x.commandsInFlight} in flight)`)),
        ...(s.protection ? [`volumes: ${summaryText(s.protection)}`] : []),
      ].join('\n'),
    );
  });

  const volume = program.command('volume').description('create, list, show, resize and delete volumes');
  volume
    .command('create <name>')
    .description('create a thin volume')
    .requiredOption('--size <size>', 'e.g. 10G, 512M, 1T')
    .addOption(new Option('--block-size <bytes>', 'logical block size').choices(['512', '4096']).default('512'))
    .option('--allow <iqn>', 'initiator allowed to log in (repeat; default: any)', collect, [])
    .option('--chap-user <user>', 'CHAP user the initiator must present')
    .option('--chap-secret <secret>', 'CHAP secret (12-16 characters)')
    .option('--mutual-user <user>', 'mutual CHAP: the user we present to the initiator')
    .option('--mutual-secret <secret>', 'mutual CHAP secret (12-16 characters)')
    .option('--peers <ids>', 'place the pages on these peers only, e.g. p1,p3 (default: all)')
    .option('--replicas <n>', `copies of each page on distinct peers, 1-${replicasMax} (default: ${defaultReplicas(2)} for a volume on 2 peers or more, else 1)`)
    .action(async (name: string, o: { size: string; blockSize: string; allow: string[]; chapUser?: string; chapSecret?: string; mutualUser?: string; mutualSecret?: string; peers?: string; replicas?: string }) => {
      if ((o.chapUser === undefined) !== (o.chapSecret === undefined)) throw new InvalidArgumentError('--chap-user and --chap-secret go together');
      if ((o.mutualUser !== undefined || o.mutualSecret !== undefined) && !o.chapUser) throw new InvalidArgumentError('mutual CHAP needs --chap-user/--chap-secret too');
      const chap = o.chapUser ? { user: o.chapUser, secret: o.chapSecret!, mutualUser: o.mutualUser, mutualSecret: o.mutualSecret } : undefined;
      const peers = o.peers ? o.peers.split(',').map((p) => p.trim()).filter(Boolean) : [];
      const replicas = o.replicas === undefined ? undefined : wholeNumber(o.replicas, '--replicas', replicasMax, 1);
      const v = await withClient(g(), (c) => c.createVolume({ name, size: o.size, blockBytes: Number(o.blockSize), allow: o.allow, chap, peers, replicas }));
      out(g(), v, () => `created volume ${v.name} (${formatBytes(v.sizeBytes)}, ${v.replicas} ${v.replicas === 1 ? 'copy' : 'copies'} of each page) on ${v.peers.join(', ')}, target ${v.targetName}`);
    });
  volume.command('list').description('all volumes').action(async () => {
    const vs = await withClient(g(), (c) => c.listVolumes());
    out(g(), vs, () => volumeRows(vs));
  });
  volume.command('show <name>').description('one volume in detail').action(async (name: string) => {
    const v = await withClient(g(), (c) => c.getVolume(name));
    out(g(), v, () => volumeDetail(v));
  });
  volume
    .command('resize <name>')
    .description('grow a volume (hosts see CAPACITY DATA HAS CHANGED)')
    .requiredOption('--size <size>', 'new size')
    .action(async (name: string, o: { size: string }) => {
      const v = await withClient(g(), (c) => c.resizeVolume(name, o.size));
      out(g(), v, () => `volume ${v.name} is now ${formatBytes(v.sizeBytes)}`);
    });
  volume
    .command('delete <name>')
    .description('delete a volume and free its space')
    .option('--force', 'even while hosts are logged in')
    .action(async (name: string, o: { force?: boolean }) => {
      await withClient(g(), (c) => c.deleteVolume(name, o.force === true));
      out(g(), { deleted: name }, () => `deleted volume ${name}`);
    });

  const page = program.command('page').description('where the pages of a volume live');
  page
    .command('map <volume>')
    .description('where the pages of a volume are: the placement rule, pages per peer, the pages that changed; --from/--count for the copies of each page of a range (runs of pages with the same copies on a line). --json pages: at most one range per answer, next says where the volume goes on')
    .option('--from <page>', 'first page of the detail', '0')
    .option('--count <pages>', `pages of the detail (at most ${pageMapPagesMax})`)
    .action(async (name: string, o: { from: string; count?: string }) => {
      const range = { from: pageNumber(o.from), count: o.count === undefined ? undefined : wholeNumber(o.count, '--count', pageMapPagesMax, 1) };
      const m = await withClient(g(), (c) => c.pageMap(name, range));
      out(g(), m, () => pageMapText(m, o.count !== undefined || range.from > 0));
    });

  page
    .command('move <volume> <page>')
    .description('make a peer the primary of a page while hosts keep using it: a role switch when it holds an in-sync copy, else the primary\'s copy moves there (dual writes while in transit)')
    .option('--to <peer>', 'destination peer id')
    .option('--wait', 'wait until the move commits, showing progress (a move whose source is down is paused, and waited for)')
    .option('--timeout <seconds>', 'with --wait: stop waiting after this long (the move goes on)', '3600')
    .option('--cancel', 'cancel the move of this page (pieces already moved are copied back)')
    .action(async (name: string, pageText: string, o: { to?: string; wait?: boolean; cancel?: boolean; timeout: string }) => {
      const n = pageNumber(pageText);
      const timeoutMs = wholeNumber(o.timeout, '--timeout', 7 * 24 * 3600, 1) * 1000;
      if (o.cancel) {
        await withClient(g(), (c) => c.cancelMove(name, n));
        out(g(), { cancelled: { volume: name, page: n } }, () => `cancelling the move of page ${n} of ${name}; pieces already moved are copied back`);
        return;
      }
      if (!o.to) throw new InvalidArgumentError('page move needs --to PEER (or --cancel)');
      const to = o.to;
      await withClient(g(), async (c) => {
        const m = await c.movePage(name, n, to);
        if (m.state === 'switched') return out(g(), m, () => `page ${n} of ${name}: primary role switched from ${m.from} to ${m.to} (it held an in-sync copy; no data copied)`);
        if (!o.wait) return out(g(), m, () => `moving page ${n} of ${name} from ${m.from} to ${m.to} (${m.pieces} pieces); follow with \`peersan migrations\``);
        if (!g().json) process.stdout.write(`moving page ${n} of ${name} from ${m.from} to ${m.to}\n`);
        const t0 = Date.now();
        const display = moveDisplay();
        try {
          await followMove(c, name, n, m.from, to, { timeoutMs, ...display });
        } finally {
          display.done();
        }
        out(g(), { volume: name, page: n, from: m.from, to, seconds: (Date.now() - t0) / 1000 }, () => `page ${n} of ${name} is now on ${to} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
      });
    });

  const snapshot = program.command('snapshot').description('point-in-time copies of volumes (consistent cuts across peers)');
  snapshot
    .command('create <volumes...>')
    .description('take a snapshot of a volume, or of several as one consistent cut (--group)')
    .option('--name <name>', 'snapshot name (default: snap-<UTC time>)')
    .addOption(new Option('--mode <mode>', 'how the cut is made').choices(['barrier', 'timestamp']).default('barrier'))
    .option('--group <name>', 'consistency group name (needed with several volumes)')
    .action(async (volumes: string[], o: { name?: string; mode: string; group?: string }) => {
      const made = await withClient(g(), (c) => c.createSnapshots(volumes, { name: o.name, mode: o.mode, group: o.group }));
      out(g(), made, () => made.map((s) => `snapshot ${s.name} of ${s.volume} taken (${s.mode}${s.group ? `, group ${s.group}` : ''}; ${s.mode === 'timestamp' ? 'host I/O not held' : `hosts held ${s.heldMs} ms`}, ${s.tookMs} ms in all); read-only target ${s.targetName}`).join('\n'));
    });
  snapshot.command('list <volume>').description('snapshots of a volume').action(async (volume: string) => {
    const list = await withClient(g(), (c) => c.listSnapshots(volume));
    out(g(), list, () => (list.length === 0 ? `volume ${volume} has no snapshots` : table([
      ['NAME', 'TAKEN', 'MODE', 'GROUP', 'HELD', 'STATE', 'TARGET'],
      ...list.map((s) => [s.name, new Date(s.createdAtMs).toISOString(), s.mode, s.group || '-', s.mode === 'timestamp' ? '-' : `${s.heldMs} ms`, s.state, s.targetName]),
    ])));
  });
  snapshot.command('delete <volume> <name>').description('delete a snapshot (every peer frees its layer)').action(async (volume: string, name: string) => {
    await withClient(g(), (c) => c.deleteSnapshot(volume, name));
    out(g(), { deleted: { volume, name } }, () => `deleted snapshot ${name} of ${volume}`);
  });

  snapshot
    .command('restore <volume> <name>')
    .description('roll a volume back to a snapshot (hosts get a unit attention)')
    .option('--force', 'even while hosts are logged in (they see the data change under them)')
    .action(async (volume: string, name: string, o: { force?: boolean }) => {
      const r = await withClient(g(), (c) => c.restoreSnapshot(volume, name, o.force === true));
      out(g(), r, () => `volume ${volume} restored from snapshot ${name} (${formatBytes(r.copiedBytes)} copied, ${formatBytes(r.unmappedBytes)} deallocated)`);
    });
  snapshot
    .command('schedule <volume>')
    .description('take snapshots on a schedule, keeping the newest N (auto-<time>)')
    .requiredOption('--every <period>', 'e.g. 15m, 1h, 1d, or "off" to stop')
    .option('--keep <n>', 'scheduled snapshots to keep', '24')
    .action(async (volume: string, o: { every: string; keep: string }) => {
      const r = await withClient(g(), (c) => c.scheduleSnapshots(volume, o.every, parseCount(o.keep, '--keep')));
      out(g(), r, () => (r.everyMs === 0 ? `snapshot schedule of ${volume} removed` : `volume ${volume}: a snapshot every ${o.every}, keeping the newest ${r.keep}`));
    });
  program
    .command('clone <volume> <snapshot> <newVolume>')
    .description('a new writable volume with the snapshot\'s data')
    .action(async (volume: string, name: string, newVolume: string) => {
      const v = await withClient(g(), (c) => c.cloneSnapshot(volume, name, newVolume));
      out(g(), v, () => `cloned snapshot ${name} of ${volume} into volume ${v.name} (${formatBytes(v.sizeBytes)}), target ${v.targetName}`);
    });

  program.command('migrations').description('page moves in flight on every peer, with progress').action(async () => {
    const r = await withClient(g(), (c) => c.migrations());
    out(g(), r, () => migrationsText(r));
  });
  addLoadCommands(program, volume, { g, withClient, out, table });

  // ---- host balancing: sessions and moving them (src/server/host-balance*.ts) --------------
  const session = program.command('session').description('iSCSI sessions: list them, move them to another peer');
  session.command('list').description('every Normal session, per peer, with its TSIH').action(async () => {
    const s = await withClient(g(), (c) => c.status());
    const rows = s.peers.flatMap((p) => p.sessions.filter((x) => x.sessionType === 'Normal').map((x) => ({ peer: p.id, ...x })));
    out(g(), rows, () => (rows.length === 0 ? 'no sessions' : table([
      ['PEER', 'TSIH', 'INITIATOR', 'ISID', 'TARGET', 'FROM', 'IN FLIGHT'],
      ...rows.map((r) => [r.peer, String(r.tsih), r.initiatorName, r.isid, r.targetName, r.remoteAddress, String(r.commandsInFlight)]),
    ])));
  });
  session
    .command('move <session>')
    .description('ask a session (TSIH, or an initiator name: all its sessions) to log out and log in again on another peer (iSCSI AsyncEvent 1 + login redirect)')
    .option('--to <peer>', 'destination peer id (default: the least loaded other peer)')
    .option('--on <peer>', 'the peer the session is logged in to (needed when a TSIH is on several)')
    .action(async (sel: string, o: { to?: string; on?: string }) => {
      const moved = await withClient(g(), (c) => c.moveSession(sel, o.to ?? '', o.on ?? ''));
      out(g(), moved, () => moved.map((m) => `asked session ${m.tsih} (${m.initiatorName} → ${m.targetName}) on ${m.from} to move to ${m.to}`).join('\n'));
    });

  const peer = program
    .command('peer')
    .description('run one peer of the group described by the config (peer --id ID); drain, undrain, remove or stop a peer')
    // Not a required option: the subcommands (drain …) do without it, and commander checks a
    // required option before it picks a subcommand.
    .option('--id <id>', 'this peer\'s id in the config')
    .action(async (o: { id?: string }) => {
      if (!o.id) throw new InvalidArgumentError('peer needs --id ID (the peer to run), or a command: drain, undrain, remove, stop');
      const path = configPath(g());
      if (!path) throw new InvalidArgumentError('peer needs --config FILE (or $PEERSAN_CONFIG, or ./cluster.yaml)');
      // The serving code (and what it loads: the store, the portal, etcd, metrics) is only
      // needed here and by demo: admin commands start in half the time without it.
      const { runPeer } = await import('./serve');
      await runPeer(loadConfig(path), o.id);
    });
  addPeerCommands(peer, { g, withClient, out });

  addInitCommand(program);

  program
    .command('demo')
    .description('start a throwaway group on 127.0.0.1 with a volume "demo"; runs until Ctrl-C')
    .option('--peers <n>', 'number of peers', '3')
    .option('--data <dir>', 'data folder, kept after the demo stops (default: a fresh temporary one, removed when it stops)')
    .option('--size <size>', 'size of volume demo', '1G')
    .option('--iscsi-port <port>', 'iSCSI port of peer 1 (peer i: +i)', '3260')
    .option('--rpc-port <port>', 'RPC port of peer 1', '7001')
    .option('--http-port <port>', 'HTTP port of peer 1', '8001')
    .option('--token <token>', 'admin token (default: random, written to the demo cluster.yaml)')
    // The global --token takes the option when it is written after `demo`, so read both.
    .action(async (o: DemoOptions) => (await import('./serve')).demo({ ...o, token: o.token ?? g().token }));
  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  program.exitOverride();
  try {
    await program.parseAsync(argv);
  } catch (err) {
    const e = err as { code?: string; exitCode?: number; message?: string };
    if (typeof e.code === 'string' && e.code.startsWith('commander.')) {
      process.exitCode = e.exitCode ?? 1;
      return;
    }
    if (process.env.PEERSAN_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
    process.stderr.write(`peersan: ${e.message ?? String(err)}\n`);
    process.exitCode = 1;
  }
}

/** `status`'s STATE: reachable or not, and the member state when it is not plain up (draining, leaving, joining). */
function peerState(p: { up: boolean; state?: string }): string {
  const member = p.state && p.state !== 'up' ? p.state : '';
  return p.up ? member || 'up' : member ? `down (${member})` : 'down';
}
