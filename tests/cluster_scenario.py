"""
Pretraining on a three-node Ray cluster on one machine (ray.cluster_utils.Cluster), losing a node
mid-run: run by tests/test_multinode.py in a subprocess of its own, so its Ray never meets the
suite's shared one.

    python tests/cluster_scenario.py RESULT.json ARTIFACT_ROOT TOKENIZER_DIR TRAIN_SHARD VAL_SHARD STEPS

The head has no CPU (it runs the driver and Ray Train's controller); nodes A and B have 2 CPUs each.
Two workers of 1 CPU with STRICT_SPREAD land on A and B; the data feeder prefers A. Once a
checkpoint exists and a step after it has run, A is removed: its worker and the feeder die. With
one node left STRICT_SPREAD cannot place two workers, so training waits until node C is added,
then restarts from the last checkpoint. RESULT.json gets what the test asserts on.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker_nodes() -> list[set[str]]:
    """Nodes of each created placement group with two bundles (the training workers')."""
    import ray

    return [set(pg["bundles_to_node_id"].values()) for pg in ray.util.placement_group_table().values()
            if pg["state"] == "CREATED" and len(pg["bundles"]) == 2]


def main() -> None:
    result_path, root, tokenizer_dir, train_shard, val_shard, steps = sys.argv[1:7]
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from nanochat_ray.checkpoint import checkpoint_dir, latest_step
    from nanochat_ray.config import make_config
    from nanochat_ray.train.pretrain import pretrain
    from nanochat_ray.stage import METRICS_LOG, RunOptions

    os.environ["NANOCHAT_BASE_DIR"] = root
    # (the GCS port is picked free when none is given: no clash with the default 6379 or other Rays)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    a, b = cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=True,
             # RAY_API_SERVER_ADDRESS: Ray Train's placement-group cleaner would otherwise look this cluster's
             # controller up in whichever other Ray on the machine it finds (see bench/pretrain.py)
             runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": root, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                                       "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}})
    stage = checkpoint_dir("base", "d2", root)
    result: dict = {"node_a": a.node_id, "node_b": b.node_id, "placements": []}

    def lose_a_node() -> None:
        # after a checkpoint and at least one step past it, so that steps are run again
        while trainer.is_alive():
            time.sleep(0.02)
            if worker_nodes() and not result["placements"]:
                result["placements"].append(sorted(worker_nodes()[0]))
            saved = latest_step(stage) if (stage / "LATEST").exists() else None
            lines = (stage / METRICS_LOG).read_text().splitlines() if (stage / METRICS_LOG).exists() else []
            if saved and lines and json.loads(lines[-1])["step"] > saved:
                break
        result["before_loss"] = {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines}
        result["checkpoint_at_loss"] = saved
        cluster.remove_node(a)
        result["removed_at"] = time.time()
        time.sleep(3)  # training must wait: one node cannot hold two STRICT_SPREAD workers
        result["waited_without_resources"] = not any(a.node_id not in nodes for nodes in worker_nodes())
        c = cluster.add_node(num_cpus=2)
        result["node_c"] = c.node_id
        while len(result["placements"]) < 2 and trainer.is_alive():
            placed = worker_nodes()
            if placed and a.node_id not in placed[0]:
                result["placements"].append(sorted(placed[0]))
            time.sleep(0.05)

    cfg = make_config("smoke", num_iterations=int(steps), save_every=4, eval_every=-1)
    failure: list[BaseException] = []

    def train() -> None:
        try:
            run = RunOptions(tokenizer_dir=Path(tokenizer_dir), num_workers=2, data_actor_cpus=0.0, max_failures=3,
                             placement_strategy="STRICT_SPREAD")
            pretrain(cfg, run, train_shards=[Path(train_shard)], val_shard=Path(val_shard),
                     feeder_options={"scheduling_strategy": NodeAffinitySchedulingStrategy(a.node_id, soft=True)})
        except BaseException as e:
            failure.append(e)

    # training on a thread: adding a node sets signal handlers, which only the main thread may do
    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        lose_a_node()
        trainer.join()
        if failure:
            raise failure[0]
        result["steps"] = [json.loads(line)["step"] for line in (stage / METRICS_LOG).read_text().splitlines()]
        result["loss"] = {json.loads(line)["step"]: json.loads(line)["loss"]
                          for line in (stage / METRICS_LOG).read_text().splitlines()}
    finally:
        Path(result_path).write_text(json.dumps(result))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
