"""
A pace for Ray Data's scheduling loop, which runs in the process of the stream's consumer (the
feeders of data/pipeline.py): `ordered_map` adds it to the DataContext's execution callbacks.

    ctx.custom_execution_callback_classes.append(PacedScheduling)
"""

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback


class PacedScheduling(ExecutionCallback):
    """A pause at each step of Ray Data's scheduling loop (it runs in the feeder's process). The loop
    waits for its tasks with ray.wait, which returns at once while a finished task's output is held
    back by the run-ahead cap: once the stream is that far ahead it spins, taking a whole core from
    the training for as long as it runs (0.9 CPU s per second, measured). Paced, it looks 1/PAUSE
    times a second at most; an item takes far longer to tokenize than a pause."""

    PAUSE_S = 0.05

    def on_execution_step(self, executor) -> None:
        time.sleep(self.PAUSE_S)
