/** A one-shot client of the control socket: one request line, one answer line. */
import { connect } from 'node:net';
import type { ControlAnswer, ControlErrorBody } from '../daemon/protocol.js';

export class UnreachableError extends Error {
  constructor(
    readonly socketPath: string,
    readonly reason: string,
    readonly denied: boolean,
  ) {
    super(denied
      ? `permission denied on the control socket ${socketPath} (${reason}): run as root or as a member of the control group`
      : `dm-remapd is not reachable on ${socketPath} (${reason}); is the daemon running? (systemctl status dm-remapd)`);
    this.name = 'UnreachableError';
  }
}

export class RequestError extends Error {
  constructor(readonly body: ControlErrorBody) {
    super(body.message);
    this.name = 'RequestError';
  }
}

let nextId = 1;

export function request(socketPath: string, cmd: string, args: Record<string, unknown>, timeoutMs: number): Promise<unknown> {
  const id = `${process.pid}-${nextId++}`;
  return new Promise((resolve, reject) => {
    const s = connect(socketPath);
    let buf = '';
    let connected = false;
    let settled = false;
    const done = (f: () => void): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      s.destroy();
      f();
    };
    const timer = setTimeout(() => done(() => reject(new RequestError({ code: 'TIMEOUT', message: `no answer from dm-remapd within ${timeoutMs} ms (${cmd})` }))), timeoutMs);
    s.setEncoding('utf8');
    s.on('connect', () => {
      connected = true;
      s.write(`${JSON.stringify({ id, cmd, args })}\n`);
    });
    s.on('data', (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let a: ControlAnswer;
        try {
          a = JSON.parse(line) as ControlAnswer;
        } catch {
          done(() => reject(new RequestError({ code: 'INTERNAL', message: `dm-remapd sent an answer that is not JSON: ${line.slice(0, 200)}` })));
          return;
        }
        if (a.id !== id && !(a.id === null && !a.ok)) continue;
        if (a.ok) done(() => resolve(a.result));
        else done(() => reject(new RequestError(a.error)));
        return;
      }
    });
    s.on('error', (err: NodeJS.ErrnoException) => {
      const code = err.code ?? err.message;
      if (!connected) done(() => reject(new UnreachableError(socketPath, code, code === 'EACCES' || code === 'EPERM')));
      else done(() => reject(new RequestError({ code: 'IO_ERROR', message: `control connection failed: ${code}` })));
    });
    s.on('close', () => {
      done(() => reject(connected
        ? new RequestError({ code: 'IO_ERROR', message: `dm-remapd closed the control connection without answering ${cmd}` })
        : new UnreachableError(socketPath, 'connection closed', false)));
    });
  });
}
