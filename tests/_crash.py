"""A training process that SIGKILLs itself at one point, for the crash tests (tests/test_resume.py):

    python tests/_crash.py PHASE:STEP -- <python -m harmodt.train flags>

It patches harmodt from outside, then runs ``harmodt.train.main``. PHASE is one of

- ``step``: right after training step STEP;
- ``mask-update``: after the mask update at STEP changed the masks, before its metric line;
- ``eval``: at the tenth action of the evaluation at STEP (STEP = ``--steps`` for the final one);
- ``checkpoint-write``: inside the checkpoint write at STEP, with half of the temporary file written.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmodt import checkpoint, mask_update, train  # noqa: E402
from harmodt.files import temp_name  # noqa: E402

PHASES = ("step", "mask-update", "eval", "checkpoint-write")


def kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(phase: str, at: int) -> None:
    """Patch the function where ``phase`` happens so that it kills the process at step ``at``."""
    trainer = {}
    train_step, update, evaluate, write_atomic = (train.Trainer.train_step, mask_update.HarmonyProbe.__call__, train.Trainer.evaluate,
                                                  checkpoint.write_atomic)

    def step(self, task_ids):
        trainer["it"] = self
        loss = train_step(self, task_ids)
        if phase == "step" and self.step == at:
            kill()
        return loss

    def masks(self):  # every mask updater's call (Algorithm2 inherits it)
        info = update(self)
        if phase == "mask-update" and self.tr.step == at:
            kill()
        return info

    def evaluation(self):
        if phase != "eval" or self.step != at:
            return evaluate(self)
        act, calls = self.model.act, [0]

        def counted_act(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 10:
                kill()
            return act(*args, **kwargs)

        self.model.act = counted_act  # an instance attribute over the method
        try:
            return evaluate(self)
        finally:
            del self.model.act

    def torn_write(path, data):
        tr = trainer.get("it")
        if phase == "checkpoint-write" and tr is not None and tr.step == at:
            tmp = temp_name(path)  # (the name the killed writer had)
            tmp.write_bytes(bytes(data[: len(data) // 2]))
            kill()
        write_atomic(path, data)

    train.Trainer.train_step, mask_update.HarmonyProbe.__call__, train.Trainer.evaluate = step, masks, evaluation
    checkpoint.write_atomic = torn_write


if __name__ == "__main__":
    point, sep, *args = sys.argv[1:]
    phase, _, at = point.rpartition(":")
    if sep != "--" or phase not in PHASES or not at.isdigit():
        sys.exit(f"usage: python tests/_crash.py PHASE:STEP -- <train flags>, PHASE one of {', '.join(PHASES)}")
    arm(phase, int(at))
    sys.exit(train.main(args))
