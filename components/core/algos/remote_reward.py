"""A reward computed by an HTTP service: a reward model served elsewhere, a sandbox that runs code, a judge.

    grpo:
      rewards:
        - {name: my_rm, url: "http://127.0.0.1:8000/score", weight: 1.0, timeout_s: 30, retries: 3, batch_size: 64}

Each request is one POST of a JSON batch, in the shapes both our users' peers send, so an OpenRLHF reward server
(`--reward.remote_url`, `serve_rm.py`) answers it unchanged:

    {"query":       ["<prompt rendered with the chat template><completion>", ...],   # OpenRLHF
     "prompts":     ["<prompt rendered>", ...],                                       # OpenRLHF
     "labels":      ["<reference answer>", ...],                                      # OpenRLHF
     "messages":    [[{"role": "user", "content": "..."}], ...],                      # the prompt as chat turns
     "completions": ["<completion text>", ...],
     "answers":     ["<reference answer>", ...]}

and reads back `{"rewards": [float, ...]}` (or `"scores"`), one per item, in order. A timeout, a refused
connection or a 5xx is retried `retries` times with exponential backoff (0.5 s, 1 s, 2 s, ...); a 4xx, an answer
that is not that JSON, or the last failed retry stops the stage with one line naming the URL, the attempts and the
last error.

Scores are cached by the hash of (prompt, completion, answer): a completion scored once is never sent again in the
run. `attach(work_dir)` makes the cache outlive a crash: every answer is appended (flushed) to
`<work_dir>/reward_cache/<name>.rank<R>.jsonl` as it arrives, and an attach reads those journals back, with the
`reward/<name>` column of the rollout tables already there; a resumed run regenerates the same completions
(generation is seeded), finds their scores, and never pays for a call twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


class RewardServiceError(RuntimeError):
    """The reward service cannot be reached or answers nonsense: the stage stops (its checkpoint stays)."""


def score_key(prompt: list[dict], completion: str, answer: str) -> str:
    blob = json.dumps([prompt, completion, answer], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class RemoteReward:
    """fn(prompt messages, completion, answer) -> float like every reward function, plus `score_batch` (one request
    per `batch_size` items not yet cached). `render(prompt) -> str` renders a prompt with the policy's chat
    template for the OpenRLHF fields (the stage sets it; plain concatenated text without one)."""

    def __init__(self, name: str, url: str, timeout_s: float = 30.0, retries: int = 3, batch_size: int = 64,
                 backoff_s: float = 0.5):
        self.name, self.url, self.timeout_s, self.retries = name, url, timeout_s, retries
        self.batch_size, self.backoff_s = batch_size, backoff_s
        self.cache: dict[str, float] = {}
        self.calls = 0  # HTTP requests answered (what a test counts)
        self._journal: Path | None = None
        host = urllib.parse.urlsplit(url).hostname or ""
        # a service on this machine is never reached through an HTTP(S)_PROXY the environment may set
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)
        self.render = lambda prompt: "".join(m["content"] for m in prompt)

    @property
    def identity(self) -> str:
        """What the scores depend on that the run can see: the service's URL (its model is its owner's)."""
        return hashlib.sha256(f"remote:{self.url}".encode()).hexdigest()[:16]

    def __call__(self, prompt: list[dict], completion: str, answer: str) -> float:
        return self.score_batch([prompt], [completion], [answer])[0]

    def score_batch(self, prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list[float]:
        keys = [score_key(p, c, a) for p, c, a in zip(prompts, completions, answers, strict=True)]
        todo, asked = [], set()  # the first index of each key not cached yet: one item asked once
        for i, k in enumerate(keys):
            if k not in self.cache and k not in asked:
                asked.add(k)
                todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            rewards = self._post([prompts[i] for i in chunk], [completions[i] for i in chunk],
                                 [answers[i] for i in chunk])
            for i, r in zip(chunk, rewards, strict=True):
                self.cache[keys[i]] = r
            if self._journal is not None:
                with open(self._journal, "a") as f:
                    f.writelines(json.dumps([keys[i], r]) + "\n" for i, r in zip(chunk, rewards, strict=True))
        return [self.cache[k] for k in keys]

    def _post(self, prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list[float]:
        rendered = [self.render(p) for p in prompts]
        body = json.dumps({"query": [r + c for r, c in zip(rendered, completions, strict=True)], "prompts": rendered,
                           "labels": answers, "messages": prompts, "completions": completions,
                           "answers": answers}).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code < 500:  # the request is wrong: asking again will not help
                    break
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e)) or type(e).__name__
                continue
            self.calls += 1
            return self._rewards(payload, len(completions))
        raise RewardServiceError(f"reward {self.name!r}: {self.url} failed after {attempt + 1} attempt(s) "
                                 f"(timeout {self.timeout_s:g} s each): {last}")

    def _rewards(self, payload: bytes, n: int) -> list[float]:
        try:
            answer = json.loads(payload)
            rewards = answer.get("rewards", answer.get("scores")) if isinstance(answer, dict) else None
            out = [float(r) for r in rewards]
        except (ValueError, TypeError) as e:
            raise RewardServiceError(f"reward {self.name!r}: {self.url} answered {payload[:200]!r}, expected "
                                     f'{{"rewards": [<{n} numbers>]}} ({e})') from None
        if len(out) != n:
            raise RewardServiceError(f"reward {self.name!r}: {self.url} returned {len(out)} rewards for {n} items")
        return out

    def attach(self, work_dir: str | Path) -> int:
        """Keep the scores of this run in work_dir (its rollouts dir, beside its checkpoints): read back the journals
        and the rollout tables there, and journal every new answer. Returns how many scores were read back."""
        import pyarrow.parquet as pq

        work = Path(work_dir)
        before = len(self.cache)
        for journal in sorted((work / "reward_cache").glob(f"{self.name}.rank*.jsonl")):
            for line in journal.read_text().splitlines():
                try:
                    key, reward = json.loads(line)
                except ValueError:  # a line cut by the crash
                    continue
                self.cache[key] = float(reward)
        column = f"reward/{self.name}"
        for path in sorted(work.glob("round_*.parquet")):
            table = pq.read_table(path)
            if column in table.column_names:
                for row in table.select(["prompt", "completion", "answer", column]).to_pylist():
                    self.cache[score_key(json.loads(row["prompt"]), row["completion"], row["answer"])] = row[column]
        (work / "reward_cache").mkdir(parents=True, exist_ok=True)
        self._journal = work / "reward_cache" / f"{self.name}.rank{os.environ.get('RANK', '0')}.jsonl"
        if len(self.cache) > before:
            log.info("reward %s: %d scores of this run read back (not asked again)", self.name, len(self.cache) - before)
        return len(self.cache) - before
