/**
 * The control socket: a unix socket server speaking the line protocol of
 * protocol.ts. Peers are checked with SO_PEERCRED: root, or a member of the
 * configured group. Nothing a client sends can crash the daemon.
 */
import { chmod, chown, lstat, unlink } from 'node:fs/promises';
import { mkdirTree } from './mkdir.js';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import type { Logger } from 'pino';
import { peerCredentials, socketFd, type PeerCredentials } from '../native/sys.js';
import { ControlError, MAX_LINE_BYTES, errorBody, type ControlAnswer } from './protocol.js';

export type CommandHandler = (args: Record<string, unknown>, peer: PeerCredentials) => Promise<unknown>;

export interface ControlServerOptions {
  path: string;
  logger: Logger;
  handlers: Record<string, CommandHandler>;
  /** A group whose members may use the socket (besides root). */
  groupId?: number;
  /** Socket file mode: 0600, or 0660 when a group is configured. */
  mode?: number;
  maxLineBytes?: number;
}

/** Whether something already answers on `path` (a running daemon). */
function probe(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export class ControlServer {
  private server: Server | null = null;
  private readonly sockets = new Set<Socket>();
  private readonly log: Logger;

  constructor(private readonly o: ControlServerOptions) {
    this.log = o.logger.child({ component: 'control' });
  }

  async listen(): Promise<void> {
    const { path } = this.o;
    // sun_path holds 107 bytes and a NUL: libuv silently binds a longer path truncated, and leaves that socket behind.
    if (Buffer.byteLength(path) > 107) throw new ControlError('INVALID_ARGUMENT', `control socket path is longer than 107 bytes: ${path}`);
    mkdirTree(dirname(path), 0o755);
    if (await probe(path)) {
      throw new ControlError('BUSY', `another dm-remapd already listens on ${path}`);
    }
    // A stale socket of a dead daemon is replaced; anything else at that path
    // (a mistyped config naming a real file) is refused, never deleted.
    const st = await lstat(path).catch(() => null);
    if (st !== null && !st.isSocket()) {
      throw new ControlError('INVALID_ARGUMENT', `control socket path ${path} exists and is not a socket; refusing to replace it`);
    }
    if (st !== null) await unlink(path).catch(() => undefined);
    const mode = this.o.mode ?? (this.o.groupId !== undefined ? 0o660 : 0o600);
    const server = createServer((s) => this.accept(s));
    server.on('error', (err) => this.log.error({ event: 'control-error', err }, 'control socket error'));
    // Bind with a umask that leaves no window in which the socket is wider than asked.
    const oldMask = process.umask(0o777 & ~mode);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } finally {
      process.umask(oldMask);
    }
    if (this.o.groupId !== undefined) await chown(path, 0, this.o.groupId).catch(() => undefined);
    await chmod(path, mode);
    this.server = server;
    this.log.info({ event: 'control-listening', path, mode: `0${mode.toString(8)}`, group: this.o.groupId ?? null }, `control socket ${path}`);
  }

  private allowed(c: PeerCredentials): boolean {
    if (c.uid === 0) return true;
    const g = this.o.groupId;
    return g !== undefined && (c.gid === g || c.groups.includes(g));
  }

  private accept(socket: Socket): void {
    socket.on('error', () => undefined);
    let creds: PeerCredentials;
    try {
      creds = peerCredentials(socketFd(socket));
    } catch (err) {
      this.log.warn({ event: 'control-refused', error: errorBody(err) }, 'control connection without peer credentials refused');
      this.refuse(socket, 'cannot verify the peer credentials of this connection');
      return;
    }
    if (!this.allowed(creds)) {
      this.log.warn({ event: 'control-refused', pid: creds.pid, uid: creds.uid, gid: creds.gid }, `control connection of uid ${creds.uid} refused`);
      this.refuse(socket, `uid ${creds.uid} (gid ${creds.gid}) may not control dm-remapd: root or a member of the control group only`);
      return;
    }
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    const max = this.o.maxLineBytes ?? MAX_LINE_BYTES;
    let parts: Buffer[] = [];
    let held = 0;
    let skipping = false;
    socket.on('data', (chunk: Buffer) => {
      let start = 0;
      for (;;) {
        const nl = chunk.indexOf(0x0a, start);
        if (nl < 0) break;
        const piece = chunk.subarray(start, nl);
        start = nl + 1;
        if (skipping) {
          skipping = false;
          parts = [];
          held = 0;
          continue;
        }
        if (held + piece.length > max) {
          parts = [];
          held = 0;
          this.tooLong(socket, max);
          continue;
        }
        const line = held === 0 ? piece : Buffer.concat([...parts, piece]);
        parts = [];
        held = 0;
        this.handleLine(socket, line, creds);
      }
      if (start < chunk.length && !skipping) {
        const rest = chunk.subarray(start);
        if (held + rest.length > max) {
          parts = [];
          held = 0;
          skipping = true; // discard up to the next newline
          this.tooLong(socket, max);
        } else {
          parts.push(Buffer.from(rest));
          held += rest.length;
        }
      }
    });
  }

  private tooLong(socket: Socket, max: number): void {
    this.send(socket, { id: null, ok: false, error: { code: 'BAD_REQUEST', message: `request line exceeds the limit of ${max} bytes; it was discarded` } });
  }

  private refuse(socket: Socket, message: string): void {
    const a: ControlAnswer = { id: null, ok: false, error: { code: 'PERMISSION_DENIED', message } };
    socket.end(`${JSON.stringify(a)}\n`);
    setTimeout(() => socket.destroy(), 1000).unref();
  }

  private send(socket: Socket, a: ControlAnswer): void {
    if (socket.destroyed || !socket.writable) return;
    let text: string;
    try {
      text = JSON.stringify(a);
    } catch (err) {
      text = JSON.stringify({ id: a.id, ok: false, error: { code: 'INTERNAL', message: `answer not serializable: ${String(err)}` } });
    }
    socket.write(`${text}\n`);
  }

  private handleLine(socket: Socket, line: Buffer, peer: PeerCredentials): void {
    const text = line.toString('utf8').trim();
    if (text === '') return;
    let req: unknown;
    try {
      req = JSON.parse(text);
    } catch (err) {
      this.send(socket, { id: null, ok: false, error: { code: 'BAD_REQUEST', message: `request is not valid JSON: ${(err as Error).message}` } });
      return;
    }
    if (typeof req !== 'object' || req === null || Array.isArray(req)) {
      this.send(socket, { id: null, ok: false, error: { code: 'BAD_REQUEST', message: 'request must be a JSON object {id, cmd, args}' } });
      return;
    }
    const r = req as Record<string, unknown>;
    const id = typeof r.id === 'string' || typeof r.id === 'number' ? r.id : null;
    if (r.id !== undefined && r.id !== null && id === null) {
      this.send(socket, { id: null, ok: false, error: { code: 'BAD_REQUEST', message: '"id" must be a string or a number' } });
      return;
    }
    if (typeof r.cmd !== 'string') {
      this.send(socket, { id, ok: false, error: { code: 'BAD_REQUEST', message: '"cmd" must be a string' } });
      return;
    }
    const args = r.args ?? {};
    if (typeof args !== 'object' || args === null || Array.isArray(args)) {
      this.send(socket, { id, ok: false, error: { code: 'BAD_REQUEST', message: '"args" must be a JSON object' } });
      return;
    }
    const cmd = r.cmd;
    const handler = Object.prototype.hasOwnProperty.call(this.o.handlers, cmd) ? this.o.handlers[cmd] : undefined;
    if (handler === undefined) {
      this.send(socket, { id, ok: false, error: { code: 'UNKNOWN_COMMAND', message: `unknown command "${cmd}"; known: ${Object.keys(this.o.handlers).join(', ')}` } });
      return;
    }
    const t0 = Date.now();
    let p: Promise<unknown>;
    try {
      p = handler(args as Record<string, unknown>, peer);
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      (result) => {
        this.log.debug({ event: 'control-request', cmd, uid: peer.uid, ms: Date.now() - t0 }, `${cmd} ok`);
        this.send(socket, { id, ok: true, result: result ?? null });
      },
      (err: unknown) => {
        const error = errorBody(err);
        this.log.info({ event: 'control-request-failed', cmd, uid: peer.uid, ms: Date.now() - t0, error }, `${cmd} failed: ${error.message}`);
        this.send(socket, { id, ok: false, error });
      },
    );
  }

  /** Stops listening, closes client connections, removes the socket file. */
  async close(): Promise<void> {
    const server = this.server;
    this.server = null;
    for (const s of this.sockets) s.destroy();
    if (server !== null) await new Promise<void>((resolve) => server.close(() => resolve()));
    await unlink(this.o.path).catch(() => undefined);
  }
}
