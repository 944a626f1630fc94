// Positional reads and writes on one file through the callback fs API: lighter per call
// than FileHandle's promises on the hot path. Short reads past the end of the file are zero
// filled (the file is sparse: a slot past EOF has never been written). I/O errors leave as
// the store's typed errors (StoreReadError, StoreWriteError, NoSpaceError), so the SCSI
// layer and other peers learn what failed, not just a message (src/errors.ts ErrorKind).

import * as fs from 'node:fs';
import { storeError } from '../errors';
import type { MediaFile } from './media';

export class DataFile implements MediaFile {
  private constructor(private readonly fd: number) {}

  static open(path: string): Promise<DataFile> {
    return new Promise((resolve, reject) => {
      fs.open(path, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600, (err, fd) => (err ? reject(err) : resolve(new DataFile(fd))));
    });
  }

  read(buf: Buffer, offset: number, length: number, position: number): Promise<void> {
    return new Promise((resolve, reject) => {
      fs.read(this.fd, buf, offset, length, position, (err, n) => {
        if (err) return reject(storeError(err, false, `reading ${length} bytes at ${position}`));
        if (n < length) buf.fill(0, offset + n, offset + length);
        resolve();
      });
    });
  }

  /** Writes all of it (loops on short writes). */
  write(buf: Buffer, offset: number, length: number, position: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const step = (off: number, len: number, pos: number): void => {
        fs.write(this.fd, buf, off, len, pos, (err, n) => {
          if (err) return reject(storeError(err, true, `writing ${len} bytes at ${pos}`));
          if (n < len) return step(off + n, len - n, pos + n);
          resolve();
        });
      };
      step(offset, length, position);
    });
  }

  datasync(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(storeError(err, true, 'fdatasync')) : resolve())));
  }

  size(): Promise<number> {
    return new Promise((resolve, reject) => fs.fstat(this.fd, (err, st) => (err ? reject(err) : resolve(st.size))));
  }

  close(): Promise<void> {
    return new Promise((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}
