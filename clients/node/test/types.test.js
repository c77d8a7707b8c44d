/** The hand-written types (index.d.ts) compile against how a TypeScript service uses the package. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

test('index.d.ts type-checks a usage file with tsc --strict', () => {
  const tsc = path.join(pkg, 'node_modules/typescript/bin/tsc');
  const out = spawnSync(
    process.execPath,
    [tsc, '--noEmit', '--strict', '--target', 'es2022', '--module', 'nodenext', '--moduleResolution', 'nodenext',
      '--types', 'node', '--skipLibCheck', 'test-support/usage.ts'],
    { cwd: pkg, encoding: 'utf8' },
  );
  assert.equal(out.status, 0, `tsc failed:\n${out.stdout}${out.stderr}`);
});
