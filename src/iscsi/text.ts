// key=value text (RFC 7143 6.1): pairs separated by NUL bytes, in login and text PDUs.
// A request may be spread over several PDUs with the C bit; TextAccumulator joins them,
// bounded by limits.textPayloadBytesMax.

import { ProtocolError } from '../errors';
import { textPayloadBytesMax } from '../limits';
import { RejectReason } from './types';

export type TextPairs = Array<[string, string]>;

const keyBytesMax = 63;
const valueBytesMax = 8192;

export function parseTextKeys(data: Buffer): TextPairs {
  if (data.length > textPayloadBytesMax) {
    throw new ProtocolError('text payload too long', RejectReason.protocolError);
  }
  const pairs: TextPairs = [];
  for (const item of data.toString('latin1').split('\0')) {
    if (item.length === 0) continue;
    const eq = item.indexOf('=');
    if (eq <= 0) throw new ProtocolError(`malformed text key "${item.slice(0, 40)}"`, RejectReason.protocolError);
    const key = item.slice(0, eq);
    const value = item.slice(eq + 1);
    if (key.length > keyBytesMax || value.length > valueBytesMax) {
      throw new ProtocolError(`text key or value too long`, RejectReason.protocolError);
    }
    pairs.push([key, value]);
  }
  return pairs;
}

export function encodeTextKeys(pairs: TextPairs): Buffer {
  if (pairs.length === 0) return Buffer.alloc(0);
  return Buffer.from(pairs.map(([k, v]) => `${k}=${v}\0`).join(''), 'latin1');
}

/** Joins the data of PDUs sent with the C (continue) bit. */
export class TextAccumulator {
  private parts: Buffer[] = [];
  private bytes = 0;

  /** Add one PDU's data; returns the whole text once a PDU without C arrives. */
  add(data: Buffer, more: boolean): Buffer | undefined {
    this.bytes += data.length;
    if (this.bytes > textPayloadBytesMax) {
      this.reset();
      throw new ProtocolError('text payload too long', RejectReason.protocolError);
    }
    this.parts.push(Buffer.from(data));
    if (more) return undefined;
    const whole = Buffer.concat(this.parts);
    this.reset();
    return whole;
  }

  reset(): void {
    this.parts = [];
    this.bytes = 0;
  }
}
