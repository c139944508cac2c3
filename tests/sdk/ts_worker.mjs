// The official TypeScript worker (`EnvironmentWorker` of @anthropic-ai/sdk) serving an environment,
// for the conformance tests: it runs until stdin closes, then stops and exits.
//
// Usage: node ts_worker.mjs BASE_URL ENVIRONMENT_ID WORKDIR; the environment key comes from
// ANTHROPIC_ENVIRONMENT_KEY and the package from STOCKADE_TS_SDK (…/node_modules/@anthropic-ai/sdk);
// STOCKADE_TS_MAX_CONCURRENT_CALLS, when set, is the worker's maxConcurrentCalls.
import path from 'node:path';

const sdk = process.env.STOCKADE_TS_SDK;
if (!sdk) throw new Error('STOCKADE_TS_SDK must name the @anthropic-ai/sdk package directory');
const { default: Anthropic } = await import(path.join(sdk, 'index.mjs'));
const { EnvironmentWorker } = await import(path.join(sdk, 'lib/environments/worker.mjs'));

const [baseURL, environmentId, workdir] = process.argv.slice(2);
const client = new Anthropic({ apiKey: 'unused', baseURL });
const stop = new AbortController();
process.stdin.on('end', () => stop.abort());
process.stdin.resume();
const worker = new EnvironmentWorker({
  client,
  environmentId,
  environmentKey: process.env.ANTHROPIC_ENVIRONMENT_KEY,
  workdir,
  maxIdleMs: 1000,
  ...(process.env.STOCKADE_TS_MAX_CONCURRENT_CALLS
    ? { maxConcurrentCalls: Number(process.env.STOCKADE_TS_MAX_CONCURRENT_CALLS) }
    : {}),
});
try {
  await worker.run(stop.signal);
} catch (e) {
  if (!stop.signal.aborted) {
    console.error(`the official TypeScript worker stopped: ${e?.stack ?? e}`);
    process.exit(1);
  }
}
process.exit(0);
