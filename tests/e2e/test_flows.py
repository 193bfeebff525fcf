"""A graph's life as a user meets it, embedded and distributed: applied with the CLI,
started by a GitHub-signed webhook, by a timer and by REST, followed live over WebSocket
to the end, its results and stored logs read back, paused (its triggers stop), and
retried from its failure (succeeded outputs reused)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .harness import Loom, until

pytestmark = pytest.mark.slow

HOOK_SECRET = "e2e-hook-secret"

GRAPH = """
name: shop
params:
  ref: {type: string, default: main}
triggers:
  - webhook:
      name: github
      auth: github
      secret: HOOK_SECRET
      events: [push]
      params: {ref: "${{ payload.ref }}"}
  - every: 1s
nodes:
  build:
    run: |
      for i in $(seq 1 200); do echo "building ${{ params.ref }} step $i"; done
      echo "artifact=shop-${{ params.ref }}" >> "$LOOM_OUTPUT"
  ship:
    needs: [build]
    run: echo "shipping ${{ nodes.build.outputs.artifact }}"
"""

FLAKY = """
name: flaky
nodes:
  first:
    run: echo "token=$RANDOM$RANDOM" >> "$LOOM_OUTPUT"
  second:
    needs: [first]
    run: |
      echo "got ${{ nodes.first.outputs.token }}"
      test -f {marker}
"""


def test_a_graph_runs_from_every_trigger_and_is_followed_paused_and_retried(
    loom: Loom, tmp_path: Path
) -> None:
    graph_file = tmp_path / "shop.yaml"
    graph_file.write_text(GRAPH)
    loom.cli("login", "--server", loom.api, "--username", "admin")
    put = loom.request("PUT", "/api/v1/secrets/HOOK_SECRET", json={"value": HOOK_SECRET})
    assert put.status_code in (200, 201, 204), put.text
    loom.cli("apply", "-f", str(graph_file))

    # REST, followed live over WebSocket until the end.
    started = loom.request(
        "POST", "/api/v1/graphs/shop/executions", json={"params": {"ref": "rest"}}
    )
    assert started.status_code == 202, started.text
    by_rest = started.json()["id"]
    frames, code = loom.follow(by_rest)
    assert code == 1000
    lines = [line for f in frames if f["type"] == "logs" for line in f["lines"]]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    texts = [line["text"] for line in lines]
    assert texts[:2] == ["building rest step 1", "building rest step 2"]
    assert "shipping shop-rest" in texts
    assert frames[-1] == {**frames[-1], "type": "execution", "status": "succeeded"}
    assert loom.stored_lines(by_rest) == texts
    nodes = {n["id"]: n for n in loom.execution(by_rest)["nodes"]}
    assert nodes["build"]["outputs"] == {"artifact": "shop-rest"}
    assert nodes["ship"]["status"] == "succeeded"

    # A GitHub-signed webhook.
    answer = loom.webhook("shop", "github", HOOK_SECRET, {"ref": "refs/heads/main"})
    assert answer.status_code == 202, answer.text
    by_hook = answer.json()["execution_id"]
    assert loom.finished(by_hook)["status"] == "succeeded"
    assert "shipping shop-refs/heads/main" in loom.stored_lines(by_hook)
    bad = loom.webhook("shop", "github", "not-the-secret", {"ref": "refs/heads/main"})
    assert bad.status_code == 401

    # The timer: `every: 1s` fires by itself.
    timed = until(
        lambda: [
            e
            for e in loom.executions("shop")
            if e["trigger"]["type"] == "timer" and e["status"] == "succeeded"
        ],
        what="a timer execution to succeed",
    )
    assert timed

    # Paused: the timer stops firing and the webhook is refused.
    loom.cli("graphs", "disable", "shop")
    time.sleep(3)  # a tick in flight when the pause committed may still finish
    before = len([e for e in loom.executions("shop") if e["trigger"]["type"] == "timer"])
    time.sleep(4)
    after = len([e for e in loom.executions("shop") if e["trigger"]["type"] == "timer"])
    assert after == before
    refused = loom.webhook("shop", "github", HOOK_SECRET, {"ref": "refs/heads/main"})
    assert refused.status_code == 404

    # Retry from failure reuses what succeeded.
    marker = tmp_path / "marker"
    flaky_file = tmp_path / "flaky.yaml"
    flaky_file.write_text(FLAKY.replace("{marker}", str(marker)))
    loom.cli("apply", "-f", str(flaky_file))
    first = loom.request("POST", "/api/v1/graphs/flaky/executions", json={}).json()["id"]
    failed = loom.finished(first)
    assert failed["status"] == "failed"
    nodes = {n["id"]: n for n in failed["nodes"]}
    assert "first" in nodes, failed
    token = nodes["first"]["outputs"]["token"]
    marker.write_text("")
    retried = loom.request("POST", f"/api/v1/executions/{first}/retry")
    assert retried.status_code in (201, 202), retried.text
    second = loom.finished(retried.json()["id"])
    assert second["status"] == "succeeded"
    assert f"got {token}" in loom.stored_lines(second["id"])
    # `first` did not run again (its token would differ): only `second` ran.
    assert [n["id"] for n in second["nodes"] if n["attempt"] >= 1 and n["started_at"]] == ["second"]
