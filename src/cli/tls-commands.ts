// The CLI's side of TLS: which credentials an admin command calls a peer with, and the
// `peersan init` command (its work is in init.ts, loaded only when it runs: certificate code
// is not needed by the other admin commands).

import type { Command } from 'commander';
import { PeersanError } from '../errors';
import type { ClusterConfig } from '../server/config';

/**
 * The cluster CA the CLI checks peers against: --ca, else $PEERSAN_CA, else the config's
 * `cluster.tls.ca`; none: plain gRPC (a group without TLS).
 */
export function clusterCaPath(g: { ca?: string }, config: ClusterConfig | undefined): string | undefined {
  return g.ca ?? process.env.PEERSAN_CA ?? config?.tls?.ca;
}

/**
 * A peer that is there but will not talk (TLS on one side only, or another group's CA) looks
 * "unavailable" to gRPC: say what to check. Other errors pass unchanged.
 */
export function withTlsHint(err: unknown, ca: string | undefined): unknown {
  if (!(err instanceof PeersanError) || err.code !== 'PEERSAN_ERR_UNREACHABLE' || !/\(unavailable\)$/.test(err.message)) return err;
  const hint = ca
    ? `TLS with the CA ${ca}: is the peer running with cluster.tls, and is this its group's CA?`
    : 'if the group runs TLS, give its CA: --ca FILE, $PEERSAN_CA, or --config with cluster.tls';
  return new PeersanError(`${err.message}; ${hint}`, err.code);
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
