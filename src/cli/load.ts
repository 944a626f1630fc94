// `peersan top`, `peersan rebalance` and `peersan volume set … --auto-balance`: the load
// monitor's and balancer's commands. Rendering is pure (topText, planText) so it is tested
// without a peer.

import type { Command } from 'commander';
import { formatBytes, replicasMax } from '../cluster/catalog';
import { summaryText, type ProtectionSummary } from '../replication/protection';
import { InvalidArgumentError } from '../errors';
import { loadHottestPagesPerVolume } from '../limits';
import type { LoadStats } from '../loadmon/ewma';
import type { RebalanceReply, TopReply } from '../loadmon/service';
import type { AdminClient, CopySpreadView } from '../server/admin';
import type { PeerFill } from '../replication/spread';
import { wholeNumber } from '../server/admin-input';

interface Json {
  json?: boolean;
}

export interface LoadCommandDeps<G extends Json> {
  g(): G;
  withClient<T>(g: G, fn: (c: AdminClient) => Promise<T>): Promise<T>;
  out(g: G, data: unknown, human: () => string): void;
  table(rows: string[][]): string;
}

const num = (n: number): string => (n >= 100 ? String(Math.round(n)) : n >= 10 ? n.toFixed(1) : n.toFixed(2));
const rate = (bytesPerSec: number): string => `${formatBytes(bytesPerSec)}/s`;
const lat = (ms: number): string => (ms > 0 ? `${num(ms)} ms` : '-');
const w10 = (a: number[]): number => a[1] ?? 0;

function statCells(s: LoadStats): string[] {
  return [`${num(s.iops[0] ?? 0)}/${num(w10(s.iops))}/${num(s.iops[2] ?? 0)}`, rate(w10(s.bytesPerSec)), lat(w10(s.latencyMs)), num(w10(s.outstandingAvg))];
}

const statHeads = ['IOPS 1s/10s/60s', 'BYTES/S 10s', 'LATENCY 10s', 'QUEUE 10s'];

/** A peer's stored page copies against its share (src/replication/spread.ts): "85/64 133%", or "85 (no share)" for a peer taking none. */
export function fillText(f: PeerFill | undefined): string {
  if (!f) return '-';
  if (!(f.shareCopies > 0)) return `${f.copies} (no share)`;
  return `${f.copies}/${Math.round(f.shareCopies)} ${Math.round((f.copies / f.shareCopies) * 100)}%`;
}

/** The column's head: copies held / share, and fill. */
export const fillHead = 'COPIES/SHARE FILL';

export function topText(v: TopReply & { protection?: ProtectionSummary } & Partial<CopySpreadView>, table: (rows: string[][]) => string): string {
  const b = v.balancer;
  const fills = new Map((v.fills ?? []).map((f) => [f.id, f]));
  const lines: string[] = [
    `group load as seen from ${v.self} · balancer ${b.enabled && b.auto ? 'automatic' : b.enabled ? 'off for the group' : 'off in cluster.yaml'} · last round: ${b.lastRound}${b.movesInFlight ? ` · ${b.movesInFlight} move(s) in flight` : ''}${v.protection ? ` · volumes: ${summaryText(v.protection)}` : ''}`,
    ...(v.spreadRound ? [`capacity spread: ${v.spreadRound}`] : []),
    '',
    table([
      ['PEER', 'STATE', 'LOAD', ...statHeads.map((h) => `OWNER ${h}`), 'HOSTS IOPS 10s', 'SESSIONS', 'FREE', ...(v.fills ? [fillHead] : [])],
      ...v.peers.map((p) => [
        p.id, p.stale ? (p.ageMs < 0 ? 'unheard' : `stale ${Math.round(p.ageMs / 1000)}s`) : 'up', num(p.load), ...statCells(p.owner),
        num(w10(p.received.iops)), String(p.sessions), p.stale ? '-' : formatBytes(p.freeBytes), ...(v.fills ? [fillText(fills.get(p.id))] : []),
      ]),
    ]),
  ];
  if (v.volumes.length > 0) {
    lines.push('', table([['VOLUME', 'LOAD', ...statHeads], ...v.volumes.map((x) => [x.volumeName, num(x.load), ...statCells(x.owner)])]));
    const pages = v.volumes.flatMap((x) => x.pages.map((p) => ({ ...p, volumeName: x.volumeName }))).sort((a, c) => c.load - a.load).slice(0, 20);
    if (pages.length > 0) lines.push('', table([['HOTTEST PAGES', 'PAGE', 'OWNER', 'LOAD', ...statHeads], ...pages.map((p) => [p.volumeName, String(p.page), p.peer, num(p.load), ...statCells(p.stats)])]));
  }
  if (v.hosts.length > 0) {
    lines.push('', table([['HOST (INITIATOR PORT)', 'TARGET', 'VIA', 'LOAD', ...statHeads], ...v.hosts.map((h) => [h.initiatorPort + (h.ended ? ' (ended)' : ''), h.targetName, h.peer, num(h.load), ...statCells(h.stats)])]));
  }
  if (v.recentMoves.length > 0) {
    lines.push('', table([['RECENT MOVES', 'PAGE', 'FROM', 'TO', 'STATE', 'AGO'], ...v.recentMoves.slice(0, 10).map((m) => [m.volumeName, String(m.page), m.from, m.to, m.state, `${Math.round(m.agoMs / 1000)}s`])]));
  }
  return lines.join('\n');
}

export function planText(r: RebalanceReply, table: (rows: string[][]) => string): string {
  const relative = (v: number): string => (r.meanLoad > 0 ? (v / (r.meanLoad * r.meanLoad)).toFixed(3) : '0');
  const lines = [
    `${r.dryRun ? 'plan (dry run)' : 'rebalance'}: ${r.reason}`,
    `predicted variance of peer load ${num(r.varianceBefore)} → ${num(r.varianceAfter)} (relative to mean² ${relative(r.varianceBefore)} → ${relative(r.varianceAfter)}; cost ${r.costBefore.toFixed(3)} → ${r.costAfter.toFixed(3)})`,
  ];
  if (r.loads.length > 0) {
    const total = r.loads.reduce((a, l) => a + l.before, 0) || 1;
    const share = (x: number): string => `${Math.round((x / total) * 100)}%`;
    lines.push(table([['PEER', 'LOAD NOW', 'SHARE', 'AFTER', 'SHARE'], ...r.loads.map((l) => [l.id, num(l.before), share(l.before), num(l.after), share(l.after)])]));
  }
  if (r.moves.length > 0) {
    lines.push(table([
      ['VOLUME', 'PAGE', 'FROM', 'TO', 'LOAD', ...(r.dryRun ? [] : ['STARTED'])],
      ...r.moves.map((m) => [m.volumeName, String(m.page), m.from, m.to, num(m.load), ...(r.dryRun ? [] : [m.started ? 'yes' : `no: ${m.error}`])]),
    ]));
  }
  return lines.join('\n');
}

function onOff(value: string, what: string): boolean {
  if (value === 'on') return true;
  if (value === 'off') return false;
  throw new InvalidArgumentError(`${what} takes on or off, got "${value}"`);
}

export function addLoadCommands<G extends Json>(program: Command, volume: Command, d: LoadCommandDeps<G>): void {
  program
    .command('top')
    .description('live load of the group: peers, volumes, hottest pages, hosts (from any peer)')
    .option('--once', 'print once and exit')
    .option('--pages <n>', `hottest pages per volume (1-${loadHottestPagesPerVolume})`, '16')
    .action(async (o: { once?: boolean; pages: string }) => {
      const pages = wholeNumber(o.pages, '--pages', loadHottestPagesPerVolume, 1);
      const g = d.g();
      await d.withClient(g, async (c) => {
        const show = async (clear: boolean): Promise<void> => {
          const v = await c.top(pages);
          if (clear && !g.json && process.stdout.isTTY) process.stdout.write('\x1b[H\x1b[2J');
          d.out(g, v, () => topText(v, d.table));
        };
        await show(false);
        if (o.once) return;
        // Refresh every second until Ctrl-C; an error (peer gone) ends it with one line.
        await new Promise<void>((resolve, reject) => {
          const timer = setInterval(() => show(true).catch((err) => finish(err)), 1000);
          const onSignal = (): void => finish();
          const finish = (err?: unknown): void => {
            clearInterval(timer);
            process.off('SIGINT', onSignal);
            process.off('SIGTERM', onSignal);
            if (err) reject(err);
            else resolve();
          };
          process.on('SIGINT', onSignal);
          process.on('SIGTERM', onSignal);
        });
      });
    });

  program
    .command('rebalance')
    .description('plan page moves that even out the peers\' load and have the owners start them')
    .option('--dry-run', 'print the plan and its predicted variance, move nothing')
    .option('--auto <on|off>', 'switch automatic balancing for the whole group (stored in the catalog)')
    .action(async (o: { dryRun?: boolean; auto?: string }) => {
      const g = d.g();
      if (o.auto !== undefined) {
        const on = onOff(o.auto, '--auto');
        const r = await d.withClient(g, (c) => c.setAutoBalance('', on));
        d.out(g, r, () => `automatic balancing ${r.on ? 'on' : 'off'} for the group`);
        return;
      }
      const r = await d.withClient(g, (c) => c.rebalance(o.dryRun === true));
      d.out(g, r, () => planText(r, d.table));
      // Moves were planned and none could start (e.g. no migration engine): a failure for scripts.
      if (!r.dryRun && r.moves.length > 0 && !r.moves.some((m) => m.started)) process.exitCode = 1;
    });

  volume
    .command('set <name>')
    .description('change a volume\'s settings')
    .option('--auto-balance <on|off>', 'let the balancer move this volume\'s pages')
    .option('--replicas <n>', `copies of each page, 1-${replicasMax}: new copies are built (or extra ones removed) live, paced`)
    .action(async (name: string, o: { autoBalance?: string; replicas?: string }) => {
      const g = d.g();
      if (o.autoBalance === undefined && o.replicas === undefined) throw new InvalidArgumentError('volume set needs --auto-balance on|off or --replicas N');
      const on = o.autoBalance === undefined ? undefined : onOff(o.autoBalance, '--auto-balance');
      const replicas = o.replicas === undefined ? undefined : wholeNumber(o.replicas, '--replicas', replicasMax, 1);
      await d.withClient(g, async (c) => {
        if (on !== undefined) {
          const r = await c.setAutoBalance(name, on);
          d.out(g, r, () => `automatic balancing ${r.on ? 'on' : 'off'} for volume ${r.volume}`);
        }
        if (replicas !== undefined) {
          const v = await c.setReplicas(name, replicas);
          d.out(g, v, () => `volume ${v.name}: ${v.replicas} ${v.replicas === 1 ? 'copy' : 'copies'} of each page asked; pages follow, paced (see \`peersan volume show ${v.name}\`)`);
        }
      });
    });
}
