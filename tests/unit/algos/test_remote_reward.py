"""A reward served over HTTP (core/algos/remote_reward.py) against a local server: the batch it sends (our fields
and OpenRLHF's), the cache that never asks twice (also across a crash, through the journal and the rollout
tables), retries with backoff on 5xx and timeouts, and one clear line when the service cannot answer."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from components.core.algos.remote_reward import RemoteReward, RewardServiceError, score_key
from components.core.algos.reward_functions import load_rewards
from components.core.config import RewardSpec

PROMPT = [{"role": "user", "content": "Sort: 3 1 2"}]


class Server:
    """Scores a completion by its length / 10. `plan`: statuses to answer first (503, 400, "junk", "slow")."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.plan: list = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                step = server.plan.pop(0) if server.plan else 200
                if step == "slow":
                    threading.Event().wait(0.5)
                    step = 200
                if step == "junk":
                    out, step = b'{"x": 1}', 200
                else:
                    out = json.dumps({"rewards": [len(c) / 10 for c in body["completions"]]}).encode()
                if step == 200:
                    server.bodies.append(body)
                self.send_response(step)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(out if step == 200 else b"{}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def items(self) -> int:
        return sum(len(b["completions"]) for b in self.bodies)


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def test_a_batch_carries_our_fields_and_openrlhfs_and_is_cached(server):
    fn = RemoteReward("rm", server.url, batch_size=2, backoff_s=0.01)
    fn.render = lambda prompt: "<|user|>" + prompt[0]["content"] + "<|assistant|>"
    out = fn.score_batch([PROMPT] * 3, ["1 2 3", "3 2 1", "1 2 3"], ["1 2 3"] * 3)
    assert out == [0.5, 0.5, 0.5]
    assert [len(b["completions"]) for b in server.bodies] == [2]  # the duplicate is asked once
    body = server.bodies[0]
    assert body["query"][0] == "<|user|>Sort: 3 1 2<|assistant|>1 2 3" and body["labels"] == ["1 2 3"] * 2
    assert body["messages"] == [PROMPT, PROMPT] and body["answers"] == ["1 2 3"] * 2
    assert fn(PROMPT, "3 2 1", "1 2 3") == 0.5 and server.items() == 2  # cached: no call
    assert fn(PROMPT, "12", "") == 0.2 and server.items() == 3


def test_5xx_and_timeouts_are_retried_then_it_answers(server):
    server.plan = [503, "slow"]
    fn = RemoteReward("rm", server.url, timeout_s=0.2, retries=2, backoff_s=0.01)
    assert fn(PROMPT, "abc", "") == pytest.approx(0.3)
    assert fn.calls == 1


@pytest.mark.parametrize(("plan", "retries", "message"), [
    ([503, 503, 503], 2, r"failed after 3 attempt\(s\) \(timeout 5 s each\): HTTP 503"),
    ([400], 3, r"failed after 1 attempt\(s\).*HTTP 400"),  # a 4xx is not retried
    (["junk"], 0, r'answered .*expected \{"rewards"'),
])
def test_a_service_that_cannot_answer_stops_with_one_line(server, plan, retries, message):
    server.plan = list(plan)
    fn = RemoteReward("rm", server.url, timeout_s=5, retries=retries, backoff_s=0.01)
    with pytest.raises(RewardServiceError, match=message) as err:
        fn(PROMPT, "abc", "")
    assert server.url in str(err.value) and "\n" not in str(err.value)


def test_nothing_listening_is_a_clear_error_after_the_retries():
    fn = RemoteReward("rm", "http://127.0.0.1:9/score", timeout_s=1, retries=1, backoff_s=0.01)
    with pytest.raises(RewardServiceError, match=r"reward 'rm': http://127.0.0.1:9/score failed after 2 attempt"):
        fn(PROMPT, "abc", "")


def test_the_journal_and_the_rollouts_bring_scores_back_after_a_crash(server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = RemoteReward("rm", server.url)
    assert first.attach(tmp_path) == 0
    first.score_batch([PROMPT] * 2, ["a", "bb"], ["", ""])
    # a rollout table written before the crash holds another completion's score
    pq.write_table(pa.Table.from_pylist([{"prompt": json.dumps(PROMPT), "completion": "ccc", "answer": "",
                                          "reward/rm": 0.3}]), tmp_path / "round_000000.parquet")
    (tmp_path / "reward_cache" / "rm.rank0.jsonl").open("a").write('["cut-by-the-cr')  # a torn last line
    resumed = RemoteReward("rm", server.url)
    assert resumed.attach(tmp_path) == 3
    assert resumed.score_batch([PROMPT] * 3, ["a", "bb", "ccc"], ["", "", ""]) == [0.1, 0.2, 0.3]
    assert server.items() == 2 and resumed.calls == 0
    assert score_key(PROMPT, "a", "") in resumed.cache


def test_params_name_a_remote_reward_with_its_url(server):
    specs = [RewardSpec(name="sorting"), RewardSpec(name="rm", url=server.url, weight=0.5, batch_size=8)]
    fns, weights, ids = load_rewards(specs)
    assert isinstance(fns["rm"], RemoteReward) and fns["rm"].batch_size == 8
    assert weights == {"sorting": 1.0, "rm": 0.5} and len(ids["rm"]) == 16 and ids["rm"] != ids["sorting"]
    with pytest.raises(ValueError, match="url"):
        RewardSpec(name="rm", url="ftp://x")
