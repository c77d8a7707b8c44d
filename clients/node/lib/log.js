/**
 * Log lines on stderr, written synchronously.
 *
 * Synchronously because the sentinel thread must be heard while the main
 * thread is stuck: a worker's `console` goes through the main thread's
 * event loop, so a line about a blocked loop would never appear. Lines are
 * `<time> <LEVEL> axion-client: <message> key=value…`; `AXION_LOG` (`error`,
 * `warn`, `info`, `debug`; default `info`) sets how much is written.
 *
 * @module
 */

import fs from 'node:fs';

const LEVELS = { error: 0, warn: 1, info: 2, debug: 3 };
const threshold = LEVELS[(process.env.AXION_LOG ?? '').trim().toLowerCase()] ?? LEVELS.info;

function write(level, message, fields = {}) {
  if (LEVELS[level] > threshold) return;
  const extra = Object.entries(fields)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
    .join(' ');
  const line = `${new Date().toISOString()} ${level.toUpperCase()} axion-client: ${message}${extra ? ` ${extra}` : ''}\n`;
  try {
    fs.writeSync(2, line);
  } catch {
    // stderr closed or full: nothing else could report it either.
  }
}

export const log = {
  error: (message, fields) => write('error', message, fields),
  warn: (message, fields) => write('warn', message, fields),
  info: (message, fields) => write('info', message, fields),
  debug: (message, fields) => write('debug', message, fields),
};
