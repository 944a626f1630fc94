// The group's certificates (issue 15 item 5): one cluster CA, and per peer a key and a
// certificate signed by it that names the peer id (subject CN and a DNS SAN) and the hosts it
// is reached at (SANs, so standard TLS tools can check the address too). Keys are RSA 2048 made
// by Node's crypto; node-forge only builds and signs the certificates (Node cannot sign X.509).
// Everything here returns PEM text: where it is written, and with which file modes, is the
// caller's business (src/cli/init.ts).

import { generateKeyPair, randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import forge from 'node-forge';
import { tlsCaDays, tlsPeerCertDays } from '../limits';

export interface KeyAndCert {
  keyPem: string;
  certPem: string;
}

const dayMs = 86_400_000;

async function rsaKeyPair(): Promise<{ publicKey: string; privateKey: string }> {
  return promisify(generateKeyPair)('rsa', {
    modulusLength: 2048,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  });
}

function baseCertificate(publicKeyPem: string, subject: forge.pki.CertificateField[], days: number, nowMs: number): forge.pki.Certificate {
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(publicKeyPem);
  // A positive 16-byte serial (the top bit clear: DER integers are signed).
  cert.serialNumber = '01' + randomBytes(15).toString('hex');
  // Backdated a minute: a peer whose clock is slightly behind still accepts a fresh certificate.
  cert.validity.notBefore = new Date(nowMs - 60_000);
  cert.validity.notAfter = new Date(nowMs + days * dayMs);
  cert.setSubject(subject);
  return cert;
}

/** A new cluster CA for group `cluster`. */
export async function createClusterCa(cluster: string, nowMs = Date.now()): Promise<KeyAndCert> {
  const keys = await rsaKeyPair();
  const subject = [{ shortName: 'CN', value: `peersan ${cluster} CA` }, { shortName: 'O', value: `peersan ${cluster}` }];
  const cert = baseCertificate(keys.publicKey, subject, tlsCaDays, nowMs);
  cert.setIssuer(subject);
  cert.setExtensions([
    { name: 'basicConstraints', cA: true, pathLenConstraint: 0, critical: true },
    { name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true },
    { name: 'subjectKeyIdentifier' },
  ]);
  cert.sign(forge.pki.privateKeyFromPem(keys.privateKey), forge.md.sha256.create());
  return { keyPem: keys.privateKey, certPem: forge.pki.certificateToPem(cert) };
}

/**
 * A key and certificate for peer `peerId`, signed by `ca`; `hosts` are the names or addresses
 * the peer's RPC is reached at. Used both to serve (serverAuth) and to call (clientAuth).
 */
export async function issuePeerCertificate(ca: KeyAndCert, peerId: string, hosts: readonly string[], nowMs = Date.now()): Promise<KeyAndCert> {
  const caCert = forge.pki.certificateFromPem(ca.certPem);
  const keys = await rsaKeyPair();
  const cert = baseCertificate(keys.publicKey, [{ shortName: 'CN', value: peerId }, ...caCert.subject.attributes.filter((a) => a.shortName === 'O')], tlsPeerCertDays, nowMs);
  cert.setIssuer(caCert.subject.attributes);
  const altNames = [peerId, ...hosts.filter((h) => h !== peerId)].map((h) => (isIp(h) ? { type: 7, ip: h } : { type: 2, value: h }));
  cert.setExtensions([
    { name: 'basicConstraints', cA: false, critical: true },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
    { name: 'extKeyUsage', serverAuth: true, clientAuth: true },
    { name: 'subjectAltName', altNames },
    { name: 'subjectKeyIdentifier' },
  ]);
  cert.sign(forge.pki.privateKeyFromPem(ca.keyPem), forge.md.sha256.create());
  return { keyPem: keys.privateKey, certPem: forge.pki.certificateToPem(cert) };
}

function isIp(h: string): boolean {
  return /^\d{1,3}(\.\d{1,3}){3}$/.test(h) || h.includes(':');
}
