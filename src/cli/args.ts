// Argument checks shared by the admin commands (main.ts) and the serving ones (serve.ts).

import { InvalidArgumentError } from '../errors';

export function parseCount(value: string, what: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new InvalidArgumentError(`${what} must be a whole number, got "${value}"`);
  return n;
}
