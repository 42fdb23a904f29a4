"""The training loop every trainer runs: steps, checkpoints and resume, SIGTERM, stops, metrics.

A trainer subclasses `TrainLoop` and supplies its data and step through three hooks:
`train_one_step()` -> (finished step, metrics), `checkpoint_extra()` (what resume needs beyond the
state, e.g. the data position) and `save_final()` (the model at the end). The loop owns the rest,
so a fix here (multi-host agreement, preemption, metrics) holds for SFT, BT, DPO, MiCoTA and PPO/CPE.
"""

import abc
import logging
import os

from cpe_jax.errors import JudgeUnavailable, UserError

log = logging.getLogger(__name__)

NONFINITE_METRIC = "numerics/nonfinite"


def configure_logging():
    """The trainers' log: ours at INFO with timestamps, other libraries' (Orbax's) chatter quiet."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("cpe_jax").setLevel(logging.INFO)


class TrainLoop(abc.ABC):
    """Base of the trainers. Subclasses set `self.total_steps` and call `start_checkpoints` once
    their initial state is placed; `run()` then trains to `total_steps` with resume."""

    progress_desc = "train"
    progress_metric = "loss"  # shown beside the progress bar

    def start_checkpoints(self, workdir, state, *, keep):
        """Open `workdir/checkpoints` and the metrics writer; restore the latest checkpoint (each
        array straight into the sharding of `state`). Returns the checkpoint's `extra`, or None."""
        from cpe_jax.checkpoints import TrainCheckpointer
        from cpe_jax.metrics import MetricsWriter
        from cpe_jax.train.state import abstract_of

        self.checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=keep)
        extra = None
        if self.checkpointer.latest_step() is not None:
            state, extra = self.checkpointer.restore(abstract_of(state))
            log.info("resumed from step %d", int(state.step))
        self.state = state
        self.metrics = MetricsWriter(workdir, resume_step=self.step)
        self._closed = False
        return extra

    @property
    def step(self):
        """The number of finished optimizer steps (the state's step counter)."""
        return int(self.state.step)

    # -- hooks --
    @abc.abstractmethod
    def train_one_step(self):
        """Run one step on the next batch; returns (the finished step number, metrics as floats)."""

    def checkpoint_extra(self):
        """JSON-serialisable data saved beside the state (data position, signatures)."""
        return {}

    def save_final(self):
        """Write the trained model once `total_steps` is reached."""

    # -- the loop --
    def save(self, force=False):
        self.checkpointer.save(self.step, self.state, extra=self.checkpoint_extra(), force=force)

    def run(self, progress=True, on_step=None):
        """Train to `total_steps` or until SIGTERM (then save the finished step and return).

        Checkpoints every `config.save_every` steps and at the end; `on_step(step, metrics)` is
        called after each step. A step with non-finite numbers ends the run without saving it
        (UserError); a judge that stopped answering saves the last finished step and ends with
        JudgeUnavailable. Returns the last finished step.
        """
        from cpe_jax.checkpoints import PreemptionGuard
        from cpe_jax.metrics import progress_bar

        save_every = int(self.config.save_every)
        bar = progress_bar(total=self.total_steps, initial=self.step, desc=self.progress_desc, enabled=progress)
        try:
            with PreemptionGuard() as guard:
                stop = False
                while self.step < self.total_steps and not stop:
                    try:
                        step, metrics = self.train_one_step()
                    except JudgeUnavailable as e:
                        self._stop_on_judge_unavailable(e)
                    self.metrics.write(step, metrics)
                    if metrics.get(NONFINITE_METRIC, 0) > 0:
                        self._stop_on_nonfinite(step, metrics[NONFINITE_METRIC])
                    bar.update(1)
                    if self.progress_metric in metrics:
                        bar.set_postfix(**{self.progress_metric.rsplit("/", 1)[-1]:
                                           f"{metrics[self.progress_metric]:.4f}"})
                    if on_step is not None:
                        on_step(step, metrics)
                    stop = guard.should_stop(step)
                    if step % save_every == 0 or step == self.total_steps or stop:
                        self.save(force=True)
                bar.close()
                if stop:
                    log.warning("SIGTERM: saved step %d, exiting", self.step)
            self.checkpointer.wait()
            if self.step >= self.total_steps:
                self.save_final()
            return self.step
        finally:
            self.close()

    def _stop_on_nonfinite(self, step, count):
        """End the run without saving the broken state: earlier checkpoints stay the latest."""
        self.checkpointer.wait()
        latest = self.checkpointer.latest_step()
        resume = f"the latest checkpoint is step {latest}" if latest is not None else "no checkpoint was written"
        raise UserError(f"step {step}: {int(count)} non-finite log-probs, values or losses "
                        f"({NONFINITE_METRIC}); stopped without saving this step, {resume}")

    def _stop_on_judge_unavailable(self, error):
        """The judge gave no answer beyond its retry budget: this step is not trained on. Save the
        last finished step and end with exit code 3; rerunning resumes from it."""
        self.checkpointer.wait()
        if self.checkpointer.latest_step() != self.step:
            self.save(force=True)
            self.checkpointer.wait()
        raise JudgeUnavailable(f"step {self.step + 1} not trained, checkpoint saved at step {self.step}; "
                               f"{error.reason}", done=self.step, remaining=self.total_steps - self.step,
                               unit="steps") from None

    def close(self):
        """Flush metrics and finish pending checkpoint writes (idempotent)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.metrics.close()
        self.checkpointer.close()
