"""Our custom metrics reach the node's Prometheus endpoint, where the Ray dashboard's Metrics tab
(through Prometheus and Grafana) reads them: training gauges from a real run, and eval results."""

import json
import re
import threading
import time
import urllib.request

import pytest

from nanochat_ray.checkpoint import checkpoint_dir
from nanochat_ray.config import make_config
from nanochat_ray.evals.actors import save_results
from nanochat_ray.evals.evaluator import numeric_leaves
from nanochat_ray.train.pretrain import pretrain
from nanochat_ray.stage import METRICS_LOG, RunOptions

# Processes push metrics to their node's agent every metrics_report_interval_ms (1 s in the test
# session, 10 s by default), and the agent drops a dead process's gauges after two intervals:
# a training worker's gauges are on the endpoint while the run lives, so we scrape during the run.
EXPORT_WAIT = 10  # seconds after the run for the last values to show


def scrape(ray) -> str:
    """The Prometheus text of this (one-node) cluster's metrics agent."""
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def samples(text: str) -> set[tuple[str, tuple, float]]:
    """(name without Ray's ray_ prefix, sorted labels, value) of every nanochat sample."""
    found = set()
    for name, labels, value in re.findall(r"^ray_(nanochat_\w+)\{(.*?)\} (\S+)$", text, flags=re.M):
        found.add((name, tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))), float(value)))
    return found


class Scraper(threading.Thread):
    """Collects every nanochat sample the endpoint shows until stopped."""

    def __init__(self, ray):
        super().__init__(daemon=True)
        self.ray, self.seen, self.done = ray, set(), threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                self.seen |= samples(scrape(self.ray))
            except OSError:  # a slow answer on a busy machine: try again
                pass
            time.sleep(0.5)  # gauges stay two push intervals (2 s here) after their process ends

    def wait_for(self, ok) -> None:
        deadline = time.monotonic() + EXPORT_WAIT
        while not ok(self.seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.done.set()
        self.join()


def test_numeric_leaves_flattens_results_and_skips_text():
    results = {"model": "sft d2 step 8", "val_bpb": 1.5, "tasks": {"GSM8K": 0.25, "MMLU": 1}, "ok": True,
               "samples": {"The capital of France is": " Paris"}}
    assert numeric_leaves(results) == [("val_bpb", 1.5), ("tasks/GSM8K", 0.25), ("tasks/MMLU", 1.0)]


def test_training_and_eval_metrics_reach_prometheus(ray_cluster, data_root, smoke_tokenizer_dir, tmp_path):
    scraper = Scraper(ray_cluster)
    scraper.start()
    # an eval job's results, as base_eval.py and chat_eval.py save them
    save_results({"model": "base d2", "val_bpb": 1.2345, "core_tasks": {"arc_easy": 0.375}}, "metrics_test_d2")
    # a real pretraining run: rank 0 sets the nanochat_base_* gauges at every step
    shards = sorted((data_root / "pretrain_text").glob("shard_*.parquet"))
    cfg = make_config("smoke", save_every=-1)
    pretrain(cfg, RunOptions(tokenizer_dir=smoke_tokenizer_dir, artifact_root=tmp_path), train_shards=shards[:1],
             val_shard=shards[-1])
    logged = [json.loads(line) for line in (checkpoint_dir("base", "d2", tmp_path) / METRICS_LOG).read_text().splitlines()]

    def from_this_run(name: str):  # a value this run logged (other d2 runs of the session may show too)
        values = [m[name] for m in logged if name in m]
        return lambda seen: any(n == f"nanochat_base_{name}" and ("model", "d2") in labels
                                and any(value == pytest.approx(v, rel=1e-9) for v in values)
                                for n, labels, value in seen)

    def eval_result(metric: str, expected: float):
        return lambda seen: any(n == "nanochat_eval_result" and {("eval", "metrics_test_d2"), ("metric", metric)} <= set(labels)
                                and value == pytest.approx(expected) for n, labels, value in seen)

    wanted = {name: from_this_run(name) for name in
              ("step", "loss_ema", "tokens_per_second", "mfu", "data_wait_fraction", "val_bpb")}
    wanted |= {"eval val_bpb": eval_result("val_bpb", 1.2345), "eval arc_easy": eval_result("core_tasks/arc_easy", 0.375)}
    scraper.wait_for(lambda seen: all(ok(seen) for ok in wanted.values()))
    missing = [name for name, ok in wanted.items() if not ok(scraper.seen)]
    assert not missing, f"never on the metrics endpoint: {missing}; seen: {sorted({n for n, _, _ in scraper.seen})}"
    assert not any(("metric", "model") in labels for _, labels, _ in scraper.seen)  # text is no metric
