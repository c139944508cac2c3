"""Runs tool calls through the official SDK's agent_toolset_20260401 and prints each result as
the SDK's session runner would post it.

Reads JSON lines `{"id", "name", "input"}` on stdin, writes `{"id", "content", "is_error"}` lines
on stdout, in order, with one toolset (one persistent bash) for the whole run. The workdir is the
first argument. Everything between the call and the printed line is the SDK's own code.
"""

import sys
import json

import anyio

from anthropic.lib.tools.agent_toolset import AgentToolContext, beta_agent_toolset_20260401
from anthropic.lib.tools._beta_functions import ToolError
from anthropic.lib.tools._tool_dispatch import tool_error_content, tool_result_content, run_runnable_tool
from anthropic.lib.tools._beta_session_runner import TOOL_TIMEOUT, _to_session_content


async def call(tools, name, input_):
    # The body of SessionToolRunner._call_tool, without the event it builds around the content.
    tool = tools.get(name)
    if tool is None:
        return [{"type": "text", "text": f"unknown tool {name!r}"}], True
    is_error = False
    try:
        with anyio.fail_after(TOOL_TIMEOUT):
            content = tool_result_content(await run_runnable_tool(tool, input_))
    except TimeoutError:
        content = f"tool {name!r} timed out"
        is_error = True
    except ToolError as e:
        content = tool_error_content(e)
        is_error = True
    except Exception as e:
        content = tool_error_content(e)
        is_error = True
    session_content, _ = _to_session_content(content)
    return session_content, is_error


async def main():
    ctx = AgentToolContext(workdir=sys.argv[1])
    tools = {t.name: t for t in beta_agent_toolset_20260401(ctx)}
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            content, is_error = await call(tools, req["name"], req.get("input", {}))
            print(json.dumps({"id": req.get("id"), "content": content, "is_error": is_error}), flush=True)
    finally:
        for t in tools.values():
            cm = getattr(t, "_context_manager", None)
            if cm is not None:
                await cm.__aexit__(None, None, None)


anyio.run(main)
