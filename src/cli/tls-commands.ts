// The CLI's side of TLS: which credentials an admin command calls a peer with, and the
// `peersan init` command (its work is in init.ts, loaded only when it runs: certificate code
// is not needed by the other admin commands).

import type { Command } from 'commander';
import { adminTlsChannel, loadCa, type TlsChannel } from '../cluster/peer-tls';
import type { ClusterConfig } from '../server/config';

/**
 * TLS against the cluster CA when one is known: --ca, else $PEERSAN_CA, else the config's
 * `cluster.tls.ca`; plain otherwise (a group without TLS).
 */
export function adminChannel(g: { ca?: string }, config: ClusterConfig | undefined): TlsChannel | undefined {
  const ca = g.ca ?? process.env.PEERSAN_CA ?? config?.tls?.ca;
  return ca ? adminTlsChannel(loadCa(ca)) : undefined;
}

export function addInitCommand(program: Command): void {
  program
    .command('init')
    .description("make a group's secrets and TLS certificates (a CA and one key + certificate per peer), private to you (0600)")
    .option('--dir <dir>', 'where cluster.yaml and tls/ are (default: the current folder)')
    .option('--peers <ids>', 'a new group: its peer ids, e.g. p1,p2,p3 (default p1); with an existing cluster.yaml its peers are used')
    .option('--add-peer <id>', "one more peer's key and certificate, signed by the CA in DIR/tls")
    .option('--host <host>', "with --add-peer: the name or address the peer's RPC is reached at (put in its certificate); for a new group: the peers' address (default 127.0.0.1)")
    .option('--name <name>', 'a new group: its name (default peersan)')
    .action(async (o: { dir?: string; peers?: string; addPeer?: string; host?: string; name?: string }) => {
      const report = await (await import('./init')).init({ ...o, peer: o.addPeer });
      process.stdout.write(report.join('\n') + '\n');
    });
}
