/**
 * One device exported over NBD: listeners (unix socket and/or TCP), the
 * handshake per connection, then the transmission session.
 */
import { chmod, lstat, stat, unlink } from 'node:fs/promises';
import * as net from 'node:net';
import { dirname } from 'node:path';
import type { Logger } from 'pino';
import { ERRNO, RemapError } from '../../errors.js';
import { exportView, type NbdBackend } from './backend.js';
import { NbdHandshake, type HandshakeConfig, type HandshakeExport } from './handshake.js';
import { newStats, serveTransmission, type NbdStats, type TransmissionSession } from './transmission.js';

export interface NbdExportOptions {
  backend: NbdBackend;
  description?: string;
  unixPath?: string;
  /** port 0 = ephemeral */
  tcp?: { host: string; port: number };
  readOnly?: boolean;
  logger: Logger;
}

/** A connection that has not finished its handshake within this time is dropped. */
const HANDSHAKE_TIMEOUT_MS = 30_000;
/** Time given to a closing connection (and to listeners) beyond the deadline. */
const CLOSE_MARGIN_MS = 250;

interface Connection {
  socket: net.Socket;
  session: TransmissionSession | null;
  closed: Promise<void>;
}

export class NbdExport {
  readonly endpoints: string[];

  private readonly backend: NbdBackend;
  private readonly description: string | undefined;
  private readonly readOnly: boolean;
  private readonly log: Logger;
  private readonly servers: net.Server[] = [];
  private readonly unixPath: string | undefined;
  private readonly conns = new Set<Connection>();
  private readonly statsValue: NbdStats = newStats();
  private nextId = 1;
  private closing = false;
  private closePromise: Promise<{ connectionsClosed: number }> | null = null;

  private constructor(opts: NbdExportOptions) {
    this.backend = opts.backend;
    this.description = opts.description;
    this.readOnly = opts.readOnly === true;
    this.log = opts.logger.child({ device: opts.backend.name, export: opts.backend.name });
    this.unixPath = opts.unixPath;
    this.endpoints = [];
  }

  /** Listen on the configured endpoints. A stale unix socket file is removed first; a live one is refused. */
  static async start(opts: NbdExportOptions): Promise<NbdExport> {
    if (opts.unixPath === undefined && opts.tcp === undefined) {
      throw new RemapError(ERRNO.EINVAL, 'an NBD export needs a unix socket path or a TCP address', { device: opts.backend.name });
    }
    const ex = new NbdExport(opts);
    const name = encodeURIComponent(opts.backend.name);
    try {
      if (opts.unixPath !== undefined) {
        const path = opts.unixPath;
        // libuv reports a missing folder as EACCES when binding a unix socket: say what is wrong.
        if (!(await stat(dirname(path)).then((st) => st.isDirectory(), () => false))) {
          throw new RemapError(ERRNO.ENOENT, `the folder ${dirname(path)} of the NBD socket ${path} does not exist`, { device: opts.backend.name });
        }
        await removeStaleSocket(path, opts.backend.name);
        const srv = ex.newServer();
        await listen(srv, { path });
        await chmod(path, 0o660);
        ex.endpoints.push(`nbd+unix:///${name}?socket=${encodeURIComponent(path).replace(/%2F/g, '/')}`);
      }
      if (opts.tcp !== undefined) {
        const srv = ex.newServer();
        await listen(srv, { host: opts.tcp.host, port: opts.tcp.port });
        const a = srv.address() as net.AddressInfo;
        const host = a.family === 'IPv6' || a.address.includes(':') ? `[${a.address}]` : a.address;
        ex.endpoints.push(`nbd://${host}:${a.port}/${name}`);
      }
    } catch (err) {
      await ex.close(0);
      throw err;
    }
    ex.log.info({ endpoints: ex.endpoints, readOnly: ex.readOnly, sizeBytes: opts.backend.sizeBytes }, 'NBD export listening');
    return ex;
  }

  connectionCount(): number {
    return this.conns.size;
  }

  /** `connections` counts every connection accepted since start; connectionCount() is the current number. */
  stats(): { connections: number; requests: number; errors: number; bytesRead: number; bytesWritten: number } {
    return { ...this.statsValue };
  }

  /**
   * Stop accepting, let in-flight requests finish until the deadline, then
   * end connections (requests still queued are answered ESHUTDOWN where
   * framing allows). Resolves within deadlineMs + a small margin; leaves no
   * handle behind. Removes the unix socket file.
   */
  close(deadlineMs: number): Promise<{ connectionsClosed: number }> {
    if (this.closePromise === null) this.closePromise = this.doClose(deadlineMs);
    return this.closePromise;
  }

  private async doClose(deadlineMs: number): Promise<{ connectionsClosed: number }> {
    this.closing = true;
    const serversClosed = this.servers.map((s) => new Promise<void>((resolve) => {
      if (!s.listening) { resolve(); return; }
      s.close(() => resolve());
    }));
    const conns = [...this.conns];
    await Promise.all(conns.map(async (c) => {
      if (c.session !== null) await c.session.shutdown(deadlineMs);
      else c.socket.destroy();
      await withTimeout(c.closed, CLOSE_MARGIN_MS);
      c.socket.destroy();
    }));
    await withTimeout(Promise.all(serversClosed), CLOSE_MARGIN_MS);
    if (this.unixPath !== undefined && this.servers.length > 0) await unlink(this.unixPath).catch(() => undefined);
    this.log.info({ connectionsClosed: conns.length }, 'NBD export closed');
    return { connectionsClosed: conns.length };
  }

  private newServer(): net.Server {
    // allowHalfOpen: a client that shuts down its side still gets its replies.
    const srv = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => this.onConnection(s));
    srv.on('error', (err) => this.log.error({ err: err.message }, 'NBD listener error'));
    this.servers.push(srv);
    return srv;
  }

  private handshakeConfig(): HandshakeConfig {
    const make = (): HandshakeExport => ({
      name: this.backend.name,
      ...(this.description !== undefined ? { description: this.description } : {}),
      view: exportView(this.backend, this.readOnly),
    });
    return {
      lookup: (name) => (name === '' || name === this.backend.name ? make() : null),
      list: () => [make()],
      shuttingDown: () => this.closing,
    };
  }

  private onConnection(socket: net.Socket): void {
    const id = this.nextId++;
    const client = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort ?? 0}` : 'unix';
    const log = this.log.child({ client, conn: id });
    if (this.closing) {
      socket.destroy();
      return;
    }
    this.statsValue.connections++;
    if (socket.remoteAddress !== undefined) socket.setNoDelay(true);
    const conn: Connection = {
      socket,
      session: null,
      closed: new Promise<void>((resolve) => socket.once('close', () => resolve())),
    };
    this.conns.add(conn);
    void conn.closed.then(() => this.conns.delete(conn));
    log.info('client connected');

    const hs = new NbdHandshake(this.handshakeConfig());
    const timer = setTimeout(() => {
      log.warn('handshake not completed in time, disconnecting');
      socket.destroy();
    }, HANDSHAKE_TIMEOUT_MS);
    timer.unref();
    const onError = (err: Error): void => {
      log.debug({ err: err.message }, 'socket error during handshake');
      socket.destroy();
    };
    const onEnd = (): void => { socket.end(); };
    const onClose = (): void => {
      clearTimeout(timer);
      if (conn.session === null) log.info('client disconnected during handshake');
    };
    const onData = (chunk: Buffer): void => {
      const step = hs.receive(chunk);
      for (const b of step.out) socket.write(b);
      const o = step.outcome;
      if (o === undefined) return;
      clearTimeout(timer);
      if (o.kind === 'close') {
        log.info({ reason: o.reason }, 'handshake ended');
        socket.end();
        const t = setTimeout(() => socket.destroy(), CLOSE_MARGIN_MS);
        t.unref();
        return;
      }
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('end', onEnd);
      socket.pause();
      const slog = log.child({ export: o.export.name });
      slog.info({ structuredReplies: o.structuredReplies, flags: `0x${o.flags.toString(16)}`, readOnly: o.export.view.readOnly }, 'handshake complete');
      conn.session = serveTransmission(socket, this.backend, {
        flags: o.flags,
        structuredReplies: o.structuredReplies,
        logger: slog,
        initialData: o.rest,
        stats: this.statsValue,
      });
    };
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('end', onEnd);
    socket.once('close', onClose);
    socket.write(hs.greeting());
    socket.resume();
  }
}

function listen(srv: net.Server, at: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    srv.once('error', onError);
    srv.listen(at, () => {
      srv.off('error', onError);
      resolve();
    });
  });
}

/** Remove a unix socket file nobody answers on; refuse a live one or a non-socket. */
async function removeStaleSocket(path: string, device: string): Promise<void> {
  let st;
  try {
    st = await lstat(path);
  } catch {
    return;
  }
  if (!st.isSocket()) {
    throw new RemapError(ERRNO.EEXIST, `${path} exists and is not a socket`, { device });
  }
  const live = await new Promise<boolean>((resolve) => {
    const s = net.connect({ path });
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
  if (live) throw new RemapError(ERRNO.EADDRINUSE, `another server is listening on ${path}`, { device });
  await unlink(path);
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(undefined), ms);
    void p.then((v) => { clearTimeout(t); resolve(v); });
  });
}
