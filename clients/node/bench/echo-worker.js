/** The benchmark's Node worker: acks every task of `BENCH_QUEUE` at once. */

import { Service } from 'axion-client';

new Service('bench-node').queue(process.env.BENCH_QUEUE ?? 'bench', () => null).run();
