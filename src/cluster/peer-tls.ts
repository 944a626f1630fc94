// TLS for the rpc port of a peer (issue 15 item 5): PeerService and AdminService (gRPC) and the
// block data streams (src/routing/data-stream.ts) share it. One gRPC server credential serves
// both services, so it asks every client for a certificate but does not require one:
//   - a peer calls with its own certificate (mutual TLS); PeerService accepts a call only when
//     the certificate verified against the cluster CA and names the peer id the call's HMAC
//     header claims (peer-rpc.ts). A client with no certificate, or one from another CA,
//     reaches no peer method. A data stream requires the certificate outright (only peers
//     open one), and its hello must claim the peer id the certificate names.
//   - the CLI and console call AdminService with no certificate: they check the server's
//     certificate against the CA and send the admin token, which TLS now keeps secret.
// A peer calling another checks that the server's certificate names the peer it meant to call.

import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { ConnectionOptions, PeerCertificate, TlsOptions } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { InvalidArgumentError } from '../errors';

/** `cluster.tls` in cluster.yaml: absolute paths; `{peer}` in cert and key stands for the peer id. */
export interface TlsFiles {
  ca: string;
  cert: string;
  key: string;
}

/** What one peer serves and calls with. */
export interface PeerTls {
  peerId: string;
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

export const peerPlaceholder = '{peer}';

/** A PEM file named by the config at `setting` (e.g. cluster.tls.ca): a missing one is a config error. */
export function readPem(path: string, setting: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new InvalidArgumentError(`${setting}: cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
}

/** Reads peer `peerId`'s CA, certificate and key, and checks they belong together. */
export function loadPeerTls(files: TlsFiles, peerId: string, nowMs = Date.now()): PeerTls {
  const tls = {
    peerId,
    ca: readPem(files.ca, 'cluster.tls.ca'),
    cert: readPem(files.cert.replaceAll(peerPlaceholder, peerId), 'cluster.tls.cert'),
    key: readPem(files.key.replaceAll(peerPlaceholder, peerId), 'cluster.tls.key'),
  };
  checkPeerCertificate(tls.ca.toString(), tls.cert.toString(), peerId, nowMs);
  return tls;
}

/** The CA alone, for an admin client. */
export function loadCa(path: string): Buffer {
  return readPem(path, 'cluster.tls.ca');
}

/**
 * grpc-js's createSsl either requires a client certificate or never asks for one; the
 * certificate-provider form can ask without requiring (see the top of this file). The
 * provider hands over its fixed material on the next tick, as grpc-js's own file watcher does:
 * the server registers its watcher only after it subscribed.
 */
class FixedCertificates implements grpc.experimental.CertificateProvider {
  constructor(private readonly tls: PeerTls) {}
  addCaCertificateListener(listener: grpc.experimental.CaCertificateUpdateListener): void {
    process.nextTick(listener, { caCertificate: this.tls.ca });
  }
  removeCaCertificateListener(): void {}
  addIdentityCertificateListener(listener: grpc.experimental.IdentityCertificateUpdateListener): void {
    process.nextTick(listener, { certificate: this.tls.cert, privateKey: this.tls.key });
  }
  removeIdentityCertificateListener(): void {}
}

export function peerServerCredentials(tls: PeerTls): grpc.ServerCredentials {
  // One provider in both roles (CA and identity): grpc-js 1.14 names the two parameters of this
  // function in the opposite order to the constructor it calls, so passing one object is safe.
  const certs = new FixedCertificates(tls);
  return grpc.experimental.createCertificateProviderServerCredentials(certs, certs, false);
}

/**
 * How a client reaches a peer's gRPC port over TLS. The TLS server name is a name, never the
 * address: SNI may not carry an IP address (RFC 6066), and the certificate is checked against
 * the peer id, not the address.
 */
export interface TlsChannel {
  credentials: grpc.ChannelCredentials;
  options: grpc.ChannelOptions;
}

/** For calling peer `calledPeerId` (mutual TLS: this peer's certificate goes with it). */
export function peerTlsChannel(tls: PeerTls, calledPeerId: string): TlsChannel {
  const credentials = grpc.credentials.createSsl(tls.ca, tls.key, tls.cert, { checkServerIdentity: namesPeer(calledPeerId) });
  return { credentials, options: { 'grpc.ssl_target_name_override': calledPeerId } };
}

/** A server identity check: the certificate must name `calledPeerId` (the address does not matter). */
function namesPeer(calledPeerId: string): (host: string, cert: PeerCertificate) => Error | undefined {
  return (_host, cert) => (cert.subject?.CN === calledPeerId ? undefined : new Error(`the peer at this address presents the certificate of "${cert.subject?.CN ?? '?'}", not of ${calledPeerId}`));
}

/** A data stream to peer `calledPeerId` (src/routing/data-stream.ts): mutual TLS, as peerTlsChannel. */
export function peerTlsConnectOptions(tls: PeerTls, calledPeerId: string): ConnectionOptions {
  return { ca: tls.ca, cert: tls.cert, key: tls.key, servername: calledPeerId, checkServerIdentity: namesPeer(calledPeerId) };
}

/** The server side of data streams (src/routing/data-stream.ts RpcListener). */
export interface DataTlsServer {
  options: TlsOptions;
  /**
   * The peer id a client's certificate names, if it is signed by the cluster CA and valid now.
   * Node checks a client certificate only for a tls.Server's connections, not for a TLSSocket
   * made by hand as a data stream's STARTTLS makes it, so the check is ours.
   */
  certifiedPeerId(cert: X509Certificate | undefined, nowMs?: number): string | undefined;
}

export function peerTlsServerOptions(tls: PeerTls): DataTlsServer {
  const ca = new X509Certificate(tls.ca);
  return {
    options: { ca: tls.ca, cert: tls.cert, key: tls.key },
    certifiedPeerId: (cert, nowMs = Date.now()) => (cert && signedAndValid(ca, cert, nowMs) ? certificatePeerId(cert) : undefined),
  };
}

function signedAndValid(ca: X509Certificate, cert: X509Certificate, nowMs: number): boolean {
  return cert.checkIssued(ca) && cert.verify(ca.publicKey) && Date.parse(cert.validTo) >= nowMs && Date.parse(cert.validFrom) <= nowMs;
}

/**
 * For the CLI and console: the server's certificate must be signed by the cluster CA (any peer
 * of the group may be asked; its address is not checked against the certificate, as peers are
 * often reached by an address their certificate does not list).
 */
export function adminTlsChannel(ca: Buffer): TlsChannel {
  return { credentials: grpc.credentials.createSsl(ca, null, null, { checkServerIdentity: () => undefined }), options: { 'grpc.ssl_target_name_override': 'peersan' } };
}

/** The peer id of a call's client certificate when it verified against the CA, else undefined. */
export function certifiedPeerId(call: { getAuthContext(): { sslPeerCertificate?: PeerCertificate } | null }): string | undefined {
  const cert = call.getAuthContext()?.sslPeerCertificate;
  const cn = cert?.subject?.CN;
  return typeof cn === 'string' ? cn : undefined;
}

/** The peer id a certificate names (its subject CN), or undefined. */
export function certificatePeerId(cert: X509Certificate): string | undefined {
  return /^CN=(.*)$/m.exec(cert.subject)?.[1];
}

/**
 * Checks that `certPem` is signed by `caPem`, is valid now and names peer `peerId`: a peer that
 * starts with another peer's certificate (or one from another group) fails at once, with a
 * message that says which, instead of being refused by every other peer later.
 */
export function checkPeerCertificate(caPem: string, certPem: string, peerId: string, nowMs = Date.now()): void {
  const ca = new X509Certificate(caPem);
  const cert = new X509Certificate(certPem);
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) throw new InvalidArgumentError(`the certificate for ${peerId} is not signed by the cluster CA (${ca.subject.replace(/\n/g, ', ')})`);
  const named = certificatePeerId(cert);
  if (named !== peerId) throw new InvalidArgumentError(`the certificate given to peer ${peerId} names peer "${named ?? '?'}"`);
  if (Date.parse(cert.validTo) < nowMs || Date.parse(cert.validFrom) > nowMs) throw new InvalidArgumentError(`the certificate of peer ${peerId} is not valid now (${cert.validFrom} to ${cert.validTo})`);
}
