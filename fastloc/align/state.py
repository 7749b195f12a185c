"""What a run carries from update to update, saved whole in every checkpoint and restored whole on
resume, so that a resumed run continues exactly: ``TrainState``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fastloc.align.checkpoint import load_objective
from fastloc.align.objective import Objective
from fastloc.align.prepare import Prepared
from fastloc.data.stream import EpochLoader


@dataclass
class TrainState:
    objective: Objective  # its whole state_dict(): trainable weights, an EMA teacher, sigma, ...
    prepared: Prepared  # the trainable part as the step runs it, its optimizer and parameters
    loader: EpochLoader  # the training loader: its epoch and position
    masks: torch.Generator  # the objective's random inputs, the same on every rank
    step: int = 0  # updates done
    validated: int = 0  # epochs whose validation and epoch-end checkpoint are done
    best_val: float = math.inf

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "validated": self.validated,
            "best_val": self.best_val,
            "objective": self.objective.state_dict(),
            "optimizer": self.prepared.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "masks": self.masks.get_state(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_objective(self.objective, state["objective"])
        self.prepared.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.masks.set_state(state["rng"]["masks"])
        self.step, self.validated, self.best_val = int(state["step"]), int(state["validated"]), float(state["best_val"])
