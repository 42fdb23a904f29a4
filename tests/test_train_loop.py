"""The one training loop (cpe_jax.train.loop): saves, resume, SIGTERM, non-finite and judge stops."""

import os
import signal

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cpe_jax.errors import JudgeUnavailable, UserError
from cpe_jax.metrics import read_metrics
from cpe_jax.train.loop import NONFINITE_METRIC, TrainLoop
from cpe_jax.train.state import TrainState


class CountingTrainer(TrainLoop):
    """A trainer whose step adds 1 to a parameter; `events` maps a step to what goes wrong there."""

    def __init__(self, workdir, total_steps, events=None):
        self.config = ml_collections.ConfigDict({"save_every": 2})
        self.total_steps, self.events, self.finals = total_steps, dict(events or {}), []
        state = TrainState(params={"w": jnp.zeros(3)}, opt_state={}, step=jnp.zeros((), jnp.int32))
        extra = self.start_checkpoints(workdir, state, keep=5)
        self.resumed_extra = extra

    def train_one_step(self):
        step = self.step + 1
        event = self.events.get(step)
        if event == "judge":
            raise JudgeUnavailable("connection refused", done=0, remaining=1)
        if event == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        self.state = self.state.replace(params={"w": self.state.params["w"] + 1}, step=self.state.step + 1)
        return step, {"loss": 1.0 / step, NONFINITE_METRIC: 3.0 if event == "nan" else 0.0}

    def checkpoint_extra(self):
        return {"position": self.step * 10}

    def save_final(self):
        self.finals.append(self.step)


def test_runs_to_the_end_saves_and_resumes(tmp_path):
    trainer = CountingTrainer(str(tmp_path), 5)
    assert trainer.run(progress=False) == 5 and trainer.finals == [5]
    assert trainer.checkpointer.all_steps() == [2, 4, 5]
    assert [row["step"] for row in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
    again = CountingTrainer(str(tmp_path), 7)
    assert again.step == 5 and again.resumed_extra == {"position": 50}
    np.testing.assert_array_equal(again.state.params["w"], [5, 5, 5])
    assert again.run(progress=False) == 7


def test_sigterm_saves_the_finished_step_and_resume_ends_where_a_straight_run_does(tmp_path):
    trainer = CountingTrainer(str(tmp_path), 6, {3: "sigterm"})
    assert trainer.run(progress=False) == 3 and trainer.finals == []
    assert trainer.checkpointer.latest_step() == 3
    resumed = CountingTrainer(str(tmp_path), 6)
    assert resumed.run(progress=False) == 6
    np.testing.assert_array_equal(resumed.state.params["w"], [6, 6, 6])
    assert [row["step"] for row in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]


def test_non_finite_step_stops_without_saving_it(tmp_path):
    trainer = CountingTrainer(str(tmp_path), 6, {3: "nan"})
    with pytest.raises(UserError, match=r"step 3: 3 non-finite .*the latest checkpoint is step 2"):
        trainer.run(progress=False)
    assert CountingTrainer(str(tmp_path), 6).step == 2


def test_judge_outage_saves_the_last_finished_step(tmp_path):
    trainer = CountingTrainer(str(tmp_path), 6, {2: "judge"})
    with pytest.raises(JudgeUnavailable) as err:
        trainer.run(progress=False)
    assert (err.value.done, err.value.remaining, err.value.unit) == (1, 5, "steps")
    assert "checkpoint saved at step 1" in str(err.value)
    assert CountingTrainer(str(tmp_path), 6).step == 1
