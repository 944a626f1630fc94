// iSCSI header and data digests: CRC32C (RFC 7143 11.1, RFC 3720 appendix B), computed in
// hardware by @node-rs/crc32 and sent least significant byte first (32 zero bytes digest to
// 0x8a9136aa, on the wire aa 36 91 8a).

import { crc32c as crc32cHw } from '@node-rs/crc32';

export const digestBytes = 4;

/** CRC32C over the concatenation of `bufs`, without concatenating them. */
export function crc32c(...bufs: Buffer[]): number {
  let crc = 0;
  for (const buf of bufs) {
    if (buf.length > 0) crc = crc32cHw(buf, crc);
  }
  return crc >>> 0;
}

export function digestBuffer(...bufs: Buffer[]): Buffer {
  const out = Buffer.allocUnsafe(digestBytes);
  out.writeUInt32LE(crc32c(...bufs), 0);
  return out;
}

export function readDigest(buf: Buffer, offset: number): number {
  return buf.readUInt32LE(offset);
}
