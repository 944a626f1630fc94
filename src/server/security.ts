// Secrets at rest and the start-up warnings about how a peer is exposed (issue 15 items 5, 6).
// cluster.yaml holds the admin token and the cluster secret; the catalog (LevelDB, embedded)
// holds CHAP secrets; tls/ holds private keys. All are made private to the peer's user: files
// 0600, folders 0700, whatever the umask. What already exists with wider modes is not changed
// behind the operator's back: the peer says so once at start-up and keeps running.

import { chmodSync, mkdirSync, statSync, writeFileSync } from 'node:fs';
import type { Logger } from 'pino';
import { splitHostPort, type ClusterConfig, type PeerConfig } from './config';

/** Write a file only its owner can read (an existing file is narrowed too). */
export function writePrivateFile(path: string, data: string | Buffer): void {
  writeFileSync(path, data, { mode: 0o600 });
  chmodSync(path, 0o600);
}

/** Create a folder only its owner can enter; an existing folder is left as it is. */
export function makePrivateDir(path: string): void {
  mkdirSync(path, { recursive: true, mode: 0o700 });
}

/** The mode of `path` (as 4 octal digits) when its group or others have any access to it. */
function openMode(path: string): string | undefined {
  let mode: number;
  try {
    mode = statSync(path).mode & 0o777;
  } catch {
    return undefined;
  }
  return (mode & 0o077) === 0 ? undefined : mode.toString(8).padStart(4, '0');
}

/**
 * cluster.yaml holds the admin token and the cluster secret (and may hold the etcd password),
 * so only its owner may read it.
 */
function configModeProblem(path: string): string | undefined {
  const mode = openMode(path);
  return mode && `${path} holds the admin token and the cluster secret but other users may read it (mode ${mode}): chmod 600 ${path}`;
}

function dirModeProblem(path: string, what: string): string | undefined {
  const mode = openMode(path);
  return mode && `${what} ${path} is open to other users (mode ${mode}): chmod 700 ${path}`;
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}

/** What is weaker than it should be about how peer `peer` runs (each a line for the log). */
export function securityWarnings(config: ClusterConfig, peer: PeerConfig, catalogDir: string | undefined): string[] {
  const out: string[] = [];
  if (!config.tls) {
    out.push('no cluster.tls in the config: peer and admin RPC travel in clear (peer calls are still authenticated per call with the cluster secret, a nonce and the time); `peersan init` makes the certificates');
  }
  const configProblem = config.path ? configModeProblem(config.path) : undefined;
  if (configProblem) out.push(configProblem);
  const dataProblem = dirModeProblem(peer.data, 'data folder');
  if (dataProblem) out.push(dataProblem);
  const catalogProblem = catalogDir ? dirModeProblem(catalogDir, 'catalog folder (CHAP secrets)') : undefined;
  if (catalogProblem) out.push(catalogProblem);
  if (!isLoopback(splitHostPort(peer.http, 'http').host)) out.push(`the console on ${peer.http} is plain HTTP: its admin token crosses the network in clear (bind it to 127.0.0.1, or put it behind a TLS proxy)`);
  return out;
}

const warned = new Set<string>();

/** Log each of these warnings once per process (the demo runs several peers in one). */
export function warnOnce(log: Logger, warnings: readonly string[]): void {
  for (const w of warnings) {
    if (warned.has(w)) continue;
    warned.add(w);
    log.warn(w);
  }
}
