"""
Reinforcement learning on GSM8K (SPEC §10): rollout actors sample and score, one learner updates.

    policy.py  plain torch: group sampling on the engine, advantages, the REINFORCE loss, pass@k
    tasks.py   what is sampled and how it is scored (GSM8K, and a toy task for plumbing checks)
    actors.py  the Ray actors: RolloutWorker (model copy + engine) and Learner (model + optimizers)
    driver.py  the driver: publish weights, deal questions, stream rollouts into the learner

    python jobs/rl.py --preset cpu
"""
