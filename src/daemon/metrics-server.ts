/**
 * The HTTP listener of the Prometheus metrics (node:http only): GET /metrics
 * on a TCP address (127.0.0.1 unless a host is configured) or a unix socket.
 * Read-only; it answers nothing but the exposition.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { chmod, lstat, unlink } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { Logger } from 'pino';
import type { MetricsConfig } from './config.js';
import { mkdirTree } from './mkdir.js';
import { CONTENT_TYPE } from './metrics.js';

/** Whether something accepts connections on the unix socket `path`. */
function socketAlive(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export interface MetricsServerOptions {
  config: MetricsConfig;
  logger: Logger;
  /** The exposition text, rendered per scrape. */
  render: () => string;
}

export class MetricsServer {
  private server: Server | null = null;
  private endpointValue = '';
  private readonly log: Logger;

  constructor(private readonly o: MetricsServerOptions) {
    this.log = o.logger.child({ component: 'metrics' });
  }

  /** Where it listens: "http://HOST:PORT/metrics" or "unix:PATH". */
  get endpoint(): string {
    return this.endpointValue;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { 'Content-Type': 'text/plain; charset=utf-8', Allow: 'GET, HEAD' }).end('only GET and HEAD\n');
      return;
    }
    if (path !== '/metrics') {
      res.writeHead(path === '/' ? 200 : 404, { 'Content-Type': 'text/plain; charset=utf-8' })
        .end(path === '/' ? 'dm-remapd: metrics at /metrics\n' : 'not found: metrics are at /metrics\n');
      return;
    }
    let body: string;
    try {
      body = this.o.render();
    } catch (err) {
      this.log.error({ event: 'metrics-failed', err: String(err) }, 'rendering the metrics failed');
      res.writeHead(500, { 'Content-Type': 'text/plain; charset=utf-8' }).end(`metrics failed: ${String(err)}\n`);
      return;
    }
    res.writeHead(200, { 'Content-Type': CONTENT_TYPE, 'Content-Length': Buffer.byteLength(body) });
    res.end(req.method === 'HEAD' ? undefined : body);
  }

  async listen(): Promise<string> {
    const { listen, socketMode } = this.o.config;
    const server = createServer((req, res) => this.handle(req, res));
    server.on('clientError', (_err, socket) => socket.destroy());
    let oldMask: number | undefined;
    if (listen.kind === 'unix') {
      mkdirTree(dirname(listen.path), 0o755);
      const st = await lstat(listen.path).catch(() => null);
      if (st !== null && !st.isSocket()) throw new Error(`metrics socket path ${listen.path} exists and is not a socket; refusing to replace it`);
      if (st !== null) {
        if (await socketAlive(listen.path)) throw new Error(`something already listens on the metrics socket ${listen.path}`);
        await unlink(listen.path).catch(() => undefined);
      }
      oldMask = process.umask(0o777 & ~socketMode);
    }
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        const done = (): void => {
          server.off('error', reject);
          resolve();
        };
        if (listen.kind === 'unix') server.listen(listen.path, done);
        else server.listen(listen.port, listen.host, done);
      });
    } finally {
      if (oldMask !== undefined) process.umask(oldMask);
    }
    server.on('error', (err) => this.log.error({ event: 'metrics-error', err: String(err) }, 'metrics listener error'));
    this.server = server;
    if (listen.kind === 'unix') {
      await chmod(listen.path, socketMode);
      this.endpointValue = `unix:${listen.path}`;
    } else {
      const a = server.address() as AddressInfo;
      this.endpointValue = `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}/metrics`;
    }
    this.log.info({ event: 'metrics-listening', endpoint: this.endpointValue }, `metrics on ${this.endpointValue}`);
    return this.endpointValue;
  }

  /** Stops listening, drops open connections, removes the unix socket. */
  async close(): Promise<void> {
    const server = this.server;
    if (server === null) return;
    this.server = null;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    server.closeAllConnections();
    await closed;
    const { listen } = this.o.config;
    if (listen.kind === 'unix') await unlink(listen.path).catch(() => undefined);
  }
}
