"""`moeserve serve` as a real process, and `moeserve generate` against it."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest

from edge_harness import demo_model_dir
from moeserve.router.client import Client

READY = re.compile(r"moeserve: serving \S+ on (\S+) ")
START_TIMEOUT_S = 180  # imports and model load on a busy 2-core machine


def moeserve(*args: str) -> list[str]:
    """The installed `moeserve` command (beside this interpreter), as a user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "moeserve")
    if os.path.exists(script):
        return [script, *args]
    return [sys.executable, "-c", "import sys; from moeserve.cluster.cli import main; sys.exit(main())", *args]


class ServeProcess:
    """`moeserve serve --port 0` in a subprocess; its stdout lines arrive on a queue."""

    def __init__(self, *extra: str):
        self.proc = subprocess.Popen(
            moeserve("serve", "--port", "0", "--model", demo_model_dir(), "--num-kv-blocks", "64", *extra),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, pattern: re.Pattern, timeout: float) -> re.Match:
        """The first output line matching `pattern`; fails if the process ends or `timeout` passes first."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no line matching {pattern.pattern!r} within {timeout} s; output:\n{''.join(self.seen)}")
            if line is None:
                pytest.fail(f"serve exited ({self.proc.wait()}) before {pattern.pattern!r}; output:\n{''.join(self.seen)}")
            self.seen.append(line)
            if m := pattern.search(line):
                return m

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def served():
    srv = ServeProcess("--prometheus-port", "0", "--http-port", "0")
    try:
        address = srv.expect(READY, START_TIMEOUT_S).group(1)
        with Client(address) as client:
            client.wait_ready(timeout=60)  # bounded wait on health
        yield srv, address
    finally:
        srv.stop()


def test_serve_prints_a_ready_to_paste_client_command(served):
    srv, address = served
    hint = srv.expect(re.compile(r"moeserve: try\s+(.*)$"), 10).group(1)
    assert "generate" in hint and f"--address {address}" in hint and "--stream" in hint


def test_serve_prints_its_openai_compatible_http_address(served):
    srv, address = served
    base = srv.expect(re.compile(r"moeserve: OpenAI-compatible HTTP on (http://\S+/v1)"), 10).group(1)
    request = urllib.request.Request(f"{base}/completions", data=json.dumps({"prompt": "Hello", "max_tokens": 3,
                                                                            "temperature": 0}).encode(),
                                     headers={"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
    with Client(address) as client:
        assert reply["choices"][0]["token_ids"] == list(client.generate(prompt="Hello", max_tokens=3).token_ids)


def test_generate_streams_what_the_server_generates(served):
    _, address = served
    with Client(address) as client:
        expected = client.generate(prompt="Hello", max_tokens=8).text
    for flags in (["--stream"], []):
        run = subprocess.run(moeserve("generate", "Hello", "--max-tokens", "8", "--address", address, *flags),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout == expected + "\n"
        assert re.search(r"\[(length|eos|stop): \d+ prompt \+ \d+ completion tokens", run.stderr)
        run = subprocess.run(moeserve("generate", "Hello", "--max-tokens", "4", "--ignore-eos", "--logprobs", "2",
                                      "--repetition-penalty", "1.1", "--presence-penalty", "0.5", "--min-tokens", "2",
                                      "--min-p", "0.05",
                                      "--logit-bias", "5=-100", "--logit-bias", "7=2.5",
                                      "--address", address, *flags), capture_output=True, text=True, timeout=120)
        lines = re.findall(r"^token \d+ logprob -?\d+\.\d+  top \d+:-?\d+\.\d+  \d+:-?\d+\.\d+$", run.stderr, re.M)
        assert run.returncode == 0 and len(lines) == 4, run.stderr
        run = subprocess.run(moeserve("generate", "Hello there", "--max-tokens", "2", "--prompt-logprobs", "1",
                                      "--address", address, *flags), capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and re.search(r"^prompt token 2 logprob -?\d+\.\d+  top \d+:", run.stderr, re.M)
        assert re.search(r"^prompt: sum of log-probabilities -?\d+\.\d+ over \d+ tokens$", run.stderr, re.M)
        run = subprocess.run(moeserve("generate", "Pick:", "--choice", "red", "--choice", "blue", "--quiet",
                                      "--address", address, *flags), capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout in ("red\n", "blue\n"), run.stderr
        tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<n>", "end": "</n>", "content": {
            "type": "json_schema", "json_schema": {"enum": [1, 2]}}}}
        run = subprocess.run(moeserve("generate", "Pick:", "--structural-tag", json.dumps(tag), "--quiet",
                                      "--address", address, *flags), capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout in ("<n>1</n>\n", "<n>2</n>\n"), run.stderr


def test_generate_chat_prints_the_reply_and_its_tool_calls(served):
    """--chat: the prompt as a user message through the Chat RPC (the demo's chat template), whole or streamed; with
    --tools and a named --tool-choice the call comes back as a line of its own."""
    _, address = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    tool = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}}}
    with Client(address) as client:
        expected = client.chat(messages, max_tokens=6, ignore_eos=True).content
        call = client.chat(messages[1:], tools=[tool], tool_choice="weather", max_tokens=40).tool_calls[0]
    for flags in (["--stream"], []):
        run = subprocess.run(moeserve("generate", "Hello", "--chat", "--system", "Be brief.", "--max-tokens", "6",
                                      "--ignore-eos", "--address", address, *flags),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout == expected + "\n"
        assert re.search(r"\[length: \d+ prompt( \(\d+ cached\))? \+ 6 completion tokens", run.stderr)
        run = subprocess.run(moeserve("generate", "Hello", "--chat", "--tools", json.dumps([tool]), "--tool-choice",
                                      "weather", "--max-tokens", "40", "-q", "--address", address, *flags),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout == f"\ntool call weather {call.arguments}\n"
    run = subprocess.run(moeserve("generate", "Hello", "--tools", "[]", "--address", address),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "go with --chat" in run.stderr


def test_metrics_endpoint_shows_the_traffic(served):
    srv, _ = served
    url = srv.expect(re.compile(r"moeserve: metrics on (http://\S+/metrics)"), 10).group(1)
    body = urllib.request.urlopen(url, timeout=30).read().decode()
    tokens = re.search(r"^moeserve_output_tokens_total (\S+)$", body, re.M)
    assert tokens and float(tokens.group(1)) >= 8, body[:2000]  # what the generate test above streamed
    assert re.search(r'^moeserve_requests_total\{finish_reason="\w+"\} [1-9]', body, re.M)
    assert re.search(r"^moeserve_kv_blocks_total 64\.0$", body, re.M)


def test_generate_reports_errors_with_their_status(served):
    _, address = served
    run = subprocess.run(moeserve("generate", "Hello", "--temperature", "-1", "--address", address),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "INVALID_ARGUMENT: temperature" in run.stderr
    run = subprocess.run(moeserve("generate", "--token-ids", "1,2,3", "--max-tokens", "3", "--ignore-eos", "-q",
                                  "--address", address), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == ""


def test_sigterm_stops_the_server_gracefully(served):
    srv, _ = served
    assert srv.stop() == 0
    srv.expect(re.compile(r"moeserve: stopped"), 30)


def test_serve_refuses_bad_flags_before_loading_anything(tmp_path):
    run = subprocess.run(moeserve("serve", "--tls-cert", str(tmp_path / "c.pem")), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "--tls-cert and --tls-key go together" in run.stderr
