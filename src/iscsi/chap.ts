// CHAP with MD5 (RFC 1994, as RFC 7143 12.1.3 uses it): response = MD5(id || secret || challenge).
// Binary values travel as hex ("0x...") or base64 ("0b...").

import { createHash, timingSafeEqual } from 'node:crypto';

export const chapAlgorithmMd5 = '5';
export const chapChallengeBytes = 16;
const binaryBytesMax = 1024;

export function chapResponse(id: number, secret: string, challenge: Buffer): Buffer {
  return createHash('md5').update(Buffer.from([id & 0xff])).update(Buffer.from(secret, 'latin1')).update(challenge).digest();
}

export function encodeChapBinary(buf: Buffer): string {
  return '0x' + buf.toString('hex');
}

/** Decode a CHAP binary value; undefined when malformed or too long. */
export function decodeChapBinary(value: string): Buffer | undefined {
  if (value.length > binaryBytesMax * 2 + 2) return undefined;
  const prefix = value.slice(0, 2).toLowerCase();
  const body = value.slice(2);
  if (prefix === '0x') {
    if (body.length === 0 || !/^[0-9a-fA-F]+$/.test(body)) return undefined;
    return Buffer.from(body.length % 2 ? '0' + body : body, 'hex');
  }
  if (prefix === '0b') {
    if (body.length === 0 || !/^[A-Za-z0-9+/]+=*$/.test(body)) return undefined;
    return Buffer.from(body, 'base64');
  }
  return undefined;
}

export function chapResponseMatches(expected: Buffer, got: Buffer | undefined): boolean {
  return got !== undefined && got.length === expected.length && timingSafeEqual(expected, got);
}
