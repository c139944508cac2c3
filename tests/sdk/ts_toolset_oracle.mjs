// Runs tool calls through the official TypeScript SDK's agent_toolset_20260401 and prints each
// result as its session runner would post it: the TypeScript twin of toolset_oracle.py.
//
// Reads JSON lines {"id", "name", "input"} on stdin, writes {"id", "content", "is_error"} lines on
// stdout, in order, with one toolset (one persistent bash) for the whole run. The workdir is the
// first argument; STOCKADE_TS_SDK names the installed package's directory (…/node_modules/@anthropic-ai/sdk).
// Everything between the call and the printed line is the SDK's own code, except the last step, the
// runner's rule for turning content into a result's blocks, which it does not export.
import readline from 'node:readline';
import path from 'node:path';

const sdk = process.env.STOCKADE_TS_SDK;
if (!sdk) throw new Error('STOCKADE_TS_SDK must name the @anthropic-ai/sdk package directory');
const { betaAgentToolset20260401 } = await import(path.join(sdk, 'tools/agent-toolset/node.mjs'));
const { runRunnableTool } = await import(path.join(sdk, 'lib/tools/BetaRunnableTool.mjs'));

const workdir = process.argv[2];
const ctx = { workdir };
const tools = new Map(betaAgentToolset20260401(ctx).map((t) => [t.name, t]));

// An empty text reads `(no output)`; images and documents pass; other blocks become their JSON.
function sessionContent(content) {
  if (typeof content === 'string') return [{ type: 'text', text: content || '(no output)' }];
  const out = content.map((b) => {
    if (b.type === 'text') return { type: 'text', text: b.text || '(no output)' };
    if (b.type === 'image' || b.type === 'document') return b;
    return { type: 'text', text: JSON.stringify(b) };
  });
  return out.length > 0 ? out : [{ type: 'text', text: '(no output)' }];
}

async function call(name, input) {
  const tool = tools.get(name);
  if (!tool) return { content: [{ type: 'text', text: `unknown tool '${name}'` }], is_error: true };
  const controller = new AbortController();
  const context = {
    toolUse: { id: 'toolu_oracle', name, input },
    toolUseBlock: { id: 'toolu_oracle', name, input },
    signal: controller.signal,
    _sessionThread: { key: 'oracle/', signal: new AbortController().signal },
  };
  const outcome = await runRunnableTool(tool, input && typeof input === 'object' && !Array.isArray(input) ? { ...input } : input, context);
  return { content: sessionContent(outcome.content ?? ''), is_error: !!outcome.isError };
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of rl) {
  if (!line.trim()) continue;
  const req = JSON.parse(line);
  const r = await call(req.name, req.input ?? {});
  await new Promise((done) => process.stdout.write(JSON.stringify({ id: req.id ?? null, ...r }) + '\n', done));
}
// The shells the toolset started would keep the process alive.
process.exit(0);
