// `peersan peer drain | undrain | remove | stop ID`: the operator's membership commands (DESIGN.md
// 7, 11; the checks and effects are src/cluster/membership-admin.ts's). Rendering is pure
// (drainText) so it is tested without a peer. `drain --wait` follows the drain until nothing is
// left to move; Ctrl-C only stops watching (the drain is the member record's state: it goes on).

import type { Command } from 'commander';
import type { DrainProgress } from '../cluster/membership-admin';
import type { MemberRecord } from '../cluster/members';
import { NotFoundError, PeersanError } from '../errors';
import { drainPollMs } from '../limits';
import type { AdminClient } from '../server/admin';

interface Json {
  json?: boolean;
}

export interface PeerCommandDeps<G extends Json> {
  g(): G;
  withClient<T>(g: G, fn: (c: AdminClient, connect: (address: string) => AdminClient) => Promise<T>): Promise<T>;
  out(g: G, data: unknown, human: () => string): void;
}

/** One line of a drain's progress: what is left on the peer. */
export function drainText(p: DrainProgress): string {
  const sessions = p.reachable ? `${p.sessions} session(s) left` : 'its sessions unknown (it does not answer)';
  const pinned = p.pinned.length > 0 ? `; pinned by a SCSI reservation, left for you: ${p.pinned.map((s) => `${s.initiatorName} → ${s.targetName} (session ${s.tsih})`).join(', ')}` : '';
  return `peer ${p.peer} ${p.state}: ${p.copies} page copies left (${p.primaries} primary), ${sessions}${pinned}`;
}

function memberText(r: MemberRecord, what: string): string {
  return `peer ${r.id} ${what} (${r.changedBy})`;
}

/** Follow a drain until it is done; rejects when it stops being a drain (undrained, removed). */
async function followDrain(c: AdminClient, id: string, show: (p: DrainProgress) => void): Promise<DrainProgress> {
  for (;;) {
    const p = await c.drainProgress(id);
    show(p);
    if (p.state !== 'draining') throw new PeersanError(`peer ${id} is ${p.state} now, no longer draining (${p.changedBy})`);
    if (p.done) return p;
    await new Promise((r) => setTimeout(r, drainPollMs));
  }
}

export function addPeerCommands<G extends Json>(peer: Command, d: PeerCommandDeps<G>): void {
  const { g, withClient, out } = d;
  peer
    .command('drain <id>')
    .description('move everything off a peer: nothing new is placed there, its copies move to the others, its hosts are asked to log in elsewhere')
    .option('--wait', 'show progress until nothing is left on it (Ctrl-C stops watching; the drain goes on)')
    .action(async (id: string, o: { wait?: boolean }) => {
      await withClient(g(), async (c) => {
        const started = await c.drainPeer(id);
        if (!o.wait) return out(g(), started, () => `${drainText(started)}; follow with \`peersan peer drain ${id} --wait\``);
        const tty = process.stdout.isTTY === true && !g().json;
        let last = '';
        const show = (p: DrainProgress): void => {
          const line = drainText(p);
          if (g().json || line === last) return;
          process.stdout.write(tty ? `\r${line}\x1b[K` : `${line}\n`);
          last = line;
        };
        const done = await followDrain(c, id, show);
        if (tty) process.stdout.write('\n');
        out(g(), done, () => `peer ${id} is drained: no copy left${done.pinned.length > 0 ? `, but ${done.pinned.length} pinned session(s) (see above)` : ''}; remove it with \`peersan peer remove ${id}\``);
      });
    });
  peer.command('undrain <id>').description('cancel a drain: the peer is up again (pages may come back through the balancer)').action(async (id: string) => {
    const r = await withClient(g(), (c) => c.undrainPeer(id));
    out(g(), r, () => memberText(r, 'is up again: nothing more moves off it'));
  });
  peer
    .command('remove <id>')
    .description('remove a drained peer from the group (its id is never given again)')
    .option('--force', 'a peer dead for good: its copies are rebuilt from the others (refused if a page would lose its last in-sync copy)')
    .action(async (id: string, o: { force?: boolean }) => {
      const r = await withClient(g(), (c) => c.removePeer(id, o.force === true));
      out(g(), r, () => memberText(r, o.force ? 'removed from the group; its copies are rebuilt on the others' : 'removed from the group'));
    });
  peer.command('stop <id>').description('stop a peer gracefully: it hands its primary roles over and asks its hosts to log out first').action(async (id: string) => {
    const r = await withClient(g(), async (c, connect) => {
      // The peer stops itself: ask it directly (the peer asked first tells its address).
      const target = (await c.status()).peers.find((p) => p.id === id);
      if (!target) throw new NotFoundError(`no peer "${id}" in the group`);
      if (target.rpc === c.address) return c.stopPeer(id);
      const direct = connect(target.rpc);
      try {
        return await direct.stopPeer(id);
      } finally {
        direct.close();
      }
    });
    out(g(), r, () => memberText(r, 'is leaving: it hands its primary roles over, asks its hosts to log out, then stops'));
  });
}
