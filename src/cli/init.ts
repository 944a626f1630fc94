// `peersan init`: the group's secrets and certificates, made private (issue 15 items 5, 6).
//   peersan init --dir DIR [--peers p1,p2,p3]   a new group: DIR/cluster.yaml with a fresh admin
//                                               token and cluster secret, and DIR/tls/ (a CA and
//                                               each peer's key and certificate);
//                                               DIR/cluster.yaml exists: TLS for its peers, and
//                                               `cluster.tls` written into it (comments kept)
//   peersan init --dir DIR --add-peer ID        one more peer's key and certificate from DIR/tls/ca.key
// Nothing that exists is overwritten (a key is never replaced behind a running group): what is
// missing is made, the rest is kept, and every file is listed with what happened to it.
// Files are 0600 and folders 0700. `peersan demo` uses the same steps for its data folder.

import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { parseDocument } from 'yaml';
import { createClusterCa, issuePeerCertificate, type KeyAndCert } from '../cluster/pki';
import { peerPlaceholder, type TlsFiles } from '../cluster/peer-tls';
import { InvalidArgumentError } from '../errors';
import { pageBlocks } from '../limits';
import { migrationDefaults, parseConfig, renderConfig, splitHostPort, type ClusterConfig } from '../server/config';
import { makePrivateDir, writePrivateFile } from '../server/security';

export interface InitOptions {
  dir?: string;
  peers?: string;
  peer?: string;
  name?: string;
  host?: string;
}

/** One line per file: what init did with it. */
export type InitReport = string[];

/** Where the TLS files of the group in `dir` live (relative paths as cluster.yaml holds them). */
export const tlsLayout = { dir: 'tls', ca: 'tls/ca.crt', caKey: 'tls/ca.key', cert: `tls/${peerPlaceholder}.crt`, key: `tls/${peerPlaceholder}.key` };

export function tlsFilesIn(dir: string): TlsFiles {
  return { ca: join(dir, tlsLayout.ca), cert: join(dir, tlsLayout.cert), key: join(dir, tlsLayout.key) };
}

const forPeer = (path: string, id: string): string => path.replaceAll(peerPlaceholder, id);

async function ensureCa(dir: string, cluster: string, report: InitReport): Promise<KeyAndCert> {
  const certPath = join(dir, tlsLayout.ca);
  const keyPath = join(dir, tlsLayout.caKey);
  makePrivateDir(join(dir, tlsLayout.dir));
  if (existsSync(certPath) && existsSync(keyPath)) {
    report.push(`kept    ${certPath} (cluster CA)`);
    return { certPem: readFileSync(certPath, 'utf8'), keyPem: readFileSync(keyPath, 'utf8') };
  }
  if (existsSync(certPath) || existsSync(keyPath)) throw new InvalidArgumentError(`${certPath} and ${keyPath} go together: one of them is missing`);
  const ca = await createClusterCa(cluster);
  writePrivateFile(keyPath, ca.keyPem);
  writePrivateFile(certPath, ca.certPem);
  report.push(`made    ${certPath} (cluster CA; its key ${keyPath} signs new peers: keep it off the peers if you can)`);
  return ca;
}

async function ensurePeerCert(dir: string, ca: KeyAndCert, id: string, hosts: string[], report: InitReport): Promise<void> {
  const certPath = join(dir, forPeer(tlsLayout.cert, id));
  const keyPath = join(dir, forPeer(tlsLayout.key, id));
  if (existsSync(certPath) && existsSync(keyPath)) {
    report.push(`kept    ${certPath}`);
    return;
  }
  const made = await issuePeerCertificate(ca, id, hosts);
  writePrivateFile(keyPath, made.keyPem);
  writePrivateFile(certPath, made.certPem);
  report.push(`made    ${certPath} and ${keyPath} (peer ${id}${hosts.length ? `, also valid for ${hosts.join(', ')}` : ''})`);
}

/** The CA and every peer's certificate in `dir`/tls, made where missing (demo and init). */
export async function ensureGroupTls(dir: string, config: Pick<ClusterConfig, 'name' | 'peers'>, report: InitReport = []): Promise<TlsFiles> {
  const ca = await ensureCa(dir, config.name, report);
  await Promise.all(config.peers.map((p) => ensurePeerCert(dir, ca, p.id, [splitHostPort(p.rpc, `peer ${p.id} rpc`).host], report)));
  return tlsFilesIn(dir);
}

function peerIds(list: string): string[] {
  const ids = list.split(',').map((s) => s.trim()).filter(Boolean);
  if (ids.length === 0) throw new InvalidArgumentError('--peers: name at least one peer, e.g. p1,p2,p3');
  return ids;
}

/** A new group's config: fresh secrets, peers on `host` at the usual ports, TLS on. */
function newGroupConfig(name: string, ids: string[], host: string): ClusterConfig {
  return {
    name,
    adminToken: randomBytes(16).toString('hex'),
    secret: randomBytes(32).toString('hex'),
    // One peer keeps its catalog itself; several share one in etcd (edit the endpoints).
    catalog: ids.length === 1 ? { backend: 'embedded' } : { backend: 'etcd', endpoints: ['127.0.0.1:2379'] },
    pageBlocks,
    migration: migrationDefaults,
    peers: ids.map((id, i) => ({ id, iscsi: `${host}:${3260 + i}`, rpc: `${host}:${7001 + i}`, http: `127.0.0.1:${8001 + i}`, data: `./${id}` })),
    tls: { ca: tlsLayout.ca, cert: tlsLayout.cert, key: tlsLayout.key },
  };
}

/** `cluster.tls` added to an existing cluster.yaml, its comments and order kept. */
function addTlsToConfigFile(path: string, report: InitReport): void {
  const doc = parseDocument(readFileSync(path, 'utf8'));
  if (doc.getIn(['cluster', 'tls']) !== undefined) {
    report.push(`kept    ${path} (it has cluster.tls already)`);
    return;
  }
  doc.setIn(['cluster', 'tls'], doc.createNode({ ca: tlsLayout.ca, cert: tlsLayout.cert, key: tlsLayout.key }));
  writePrivateFile(path, doc.toString());
  report.push(`changed ${path}: cluster.tls = { ca: ${tlsLayout.ca}, cert: ${tlsLayout.cert}, key: ${tlsLayout.key} }`);
}

export async function init(o: InitOptions): Promise<InitReport> {
  const dir = resolve(o.dir ?? '.');
  const configPath = join(dir, 'cluster.yaml');
  const report: InitReport = [];
  makePrivateDir(dir);
  if (o.peer) {
    if (!existsSync(join(dir, tlsLayout.caKey))) throw new InvalidArgumentError(`--add-peer: no cluster CA in ${join(dir, tlsLayout.dir)} (run \`peersan init --dir ${dir}\` first)`);
    const ca = await ensureCa(dir, o.name ?? 'peersan', report);
    await ensurePeerCert(dir, ca, o.peer, o.host ? [o.host] : [], report);
    return report;
  }
  if (existsSync(configPath)) {
    if (o.peers) throw new InvalidArgumentError(`${configPath} exists: its peers get certificates (add a peer with --add-peer ID)`);
    const config = parseConfig(readFileSync(configPath, 'utf8'), configPath);
    await ensureGroupTls(dir, config, report);
    addTlsToConfigFile(configPath, report);
    return report;
  }
  const config = newGroupConfig(o.name ?? 'peersan', peerIds(o.peers ?? 'p1'), o.host ?? '127.0.0.1');
  await ensureGroupTls(dir, config, report);
  writePrivateFile(configPath, renderConfig(config));
  report.push(`made    ${configPath} (group ${config.name}, peers ${config.peers.map((p) => p.id).join(', ')}; a fresh admin token and cluster secret; edit the addresses, then run \`peersan peer --config ${configPath} --id ID\` on each peer)`);
  return report;
}
