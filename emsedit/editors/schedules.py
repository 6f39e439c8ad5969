"""The meta-training schedules (spec §7): how an editor's hypernetworks are trained on turns.

* ``batch`` — MEND/MALMEN and EMSEdit in batch mode: each MSBP step is cached, predicted, applied,
  scored (paraphrase CE + locality), reverted (quirk 5) and followed by an optimiser step;
* ``rollout`` — EMSEdit sequential: a training rollout whose S steps per turn are kept, one loss at
  the final weights whose Γ reaches every step's network, one Adam step per rollout (quirk 1);
* ``rollout_backtrack`` — RLEdit: a rollout whose loss covers the memory of the last ``back_depth``
  turns, each step back-propagated on its own and every step's network receiving the last Γ.

:class:`TrainingSchedules` is a mixin of :class:`emsedit.editors.base.Editor`; it uses the editor's
caching, prediction, losses and optimiser step and adds nothing else to its state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING


from emsedit.models import snapshot_weights
from emsedit.prefix_cache import warm_turns
from emsedit.progress import Progress

if TYPE_CHECKING:
    from emsedit.data import Turn
    from emsedit.editors.base import CheckpointHook, Shifts, StepCache


class TrainingSchedules:
    """Meta-training of an :class:`~emsedit.editors.base.Editor` with its resolved ``schedule``."""

    @property
    def training_kinds(self) -> tuple[str, ...]:
        """The mini-batch lists meta-training passes over: edit prompts (caching), paraphrases (edit
        loss) and, with the KL loss only, locality prompts."""
        return ("edit", "equiv", "unrel") if self.hp.loss == "kl" else ("edit", "equiv")

    # ------------------------------------------------------------------ one training step
    def _train_shift(self, turn: Turn, step: int) -> tuple[StepCache, Shifts] | None:
        """Cache and predict one training step; None (counted) when the shift is not finite."""
        with self.timer.phase("train_cache"):
            cache = self.cache(turn, step)
        with self.timer.phase("train_predict_shift"), self.keeping_graphs():  # reused by the meta-gradient
            shifts = self.predict(step, cache)
        if not self._all_finite(shifts.values()):
            self._nonfinite(f"training shift, step {step + 1}", self.stats)
            return None
        return cache, shifts

    def _train_step(
        self,
        turn: Turn,
        step: int,
        *,
        loss_turns: Sequence[tuple[Turn, float]],
        eta: float,
    ) -> tuple[StepCache, Shifts] | None:
        """Cache, predict and apply one step, then back-propagate the meta-loss into the weights.

        Returns (cache, shifts) with the shift applied and Γ in the weights' ``.grad``, or None when
        the step was not finite (nothing is then left applied).
        """
        out = self._train_shift(turn, step)
        if out is None:
            return None
        cache, shifts = out
        refs = None
        if self.hp.loss == "kl":
            with self.timer.phase("train_locality_loss"):
                refs = self.reference_log_probs([b for t, _ in loss_turns for b in t.unrel])
        self.zero_lm_grads()
        unedited = self._kl_backward_weights(refs)
        self.apply(shifts)
        with self.timer.phase("train_edit_loss"):
            edit = self.edit_loss(loss_turns)
        with self.timer.phase("train_locality_loss"):
            loc = self.kl_loss(loss_turns, refs, unedited) if refs is not None else self.add_l2_grad(eta)
        if not (math.isfinite(edit) and math.isfinite(loc)):
            self.apply(shifts, -1)
            self.zero_lm_grads()
            self._nonfinite(f"training loss, step {step + 1}", self.stats)
            return None
        self._nonfinite_in_row = 0
        self.stats["losses"].append(round(edit + loc, 6))
        return cache, shifts

    def _kl_backward_weights(self, refs: object) -> Shifts | None:
        """The weights at which RLEdit's KL term is back-propagated: this step's unedited ones.

        The official RLEdit reverts the step's edit (through ``.data``) before ``backward`` on the
        summed KL term, so autograd's input-Jacobians of the edited layers see W, not W + ΔW
        (``kl_backward_reverted``; only the backtracking schedule, only with the KL loss).
        """
        if refs is None or self.schedule != "rollout_backtrack" or not self.hp.kl_backward_reverted:
            return None
        return snapshot_weights(self.modules)

    def _update(self, steps: Sequence[tuple[int, StepCache, Shifts]], gammas: Shifts) -> None:
        """Meta-gradient of each given step from the same Γ, clipping after each (spec §7.5.2)."""
        with self.timer.phase("train_hypernet_update"):
            for step, cache, shifts in steps:
                self.accumulate_metagrad(step, cache, shifts, gammas)
                self.clip()

    # ------------------------------------------------------------------ schedules
    def meta_train(self, turns: Sequence[Turn], *, on_turn_done: CheckpointHook | None = None,
                   start: int = 0) -> None:
        """Meta-train on the given training turns with this editor's schedule.

        ``start`` skips the first ``start`` units of work (epoch × turns) when resuming from a
        checkpoint; ``on_turn_done(phase, units_done)`` is called after each unit.
        """
        if not self.trains or self.schedule == "none":
            return
        schedule = {
            "batch": self._train_batch,
            "rollout": self._train_rollout,
            "rollout_backtrack": self._train_backtrack,
        }[self.schedule]
        units = [(epoch, t) for epoch in range(self.hp.n_epochs) for t in range(len(turns))]
        bar = Progress(f"meta-train {self.hp.name}", len(units), initial=start)
        warmed = 0  # training turns whose lower layers are known (computed, or replayed from a file)
        for unit, (epoch, t) in enumerate(units):
            if unit < start:
                continue
            if warmed <= t:  # before any pass touches them, in the grouping a shared file uses
                with self.timer.phase("train_lower_layers"):
                    warm_turns(self.model, turns[warmed:t + 1], self.training_kinds)
                warmed = t + 1
            if t == 0 and epoch > 0:
                self.restore_weights()  # each epoch's rollout starts from the original weights
            schedule(turns, t, last=(t == len(turns) - 1))
            self.drop_kept_graphs()
            self.stats["train_turns"] += 1
            bar.update()
            if on_turn_done is not None:
                on_turn_done("train", unit + 1)
        bar.close()
        self.restore_weights()

    def _train_batch(self, turns: Sequence[Turn], t: int, *, last: bool) -> None:
        """MEND/MALMEN training, and EMSEdit's step-wise updating in batch mode (spec §7.2, §7.5.3).

        Each step: cache → predict → apply → CE(paraphrases) + locality → revert → meta-gradient →
        Adam step. With ``batch_train_revert: false`` step s trains from W + ΔW_{<s} instead.
        """
        turn = turns[t]
        applied: list[Shifts] = []
        for step in range(self.hp.steps):
            out = self._train_step(turn, step, loss_turns=[(turn, 1.0)], eta=self.hp.eta)
            if out is None:
                continue
            cache, shifts = out
            gammas = self.weight_grads()
            self.zero_lm_grads()
            if self.hp.batch_train_revert:
                self.apply(shifts, -1)
            else:
                applied.append(shifts)
            self._update([(step, cache, shifts)], gammas)
            self.optimizer_step()
        for shifts in reversed(applied):
            self.apply(shifts, -1)

    def _rollout_eta(self) -> float:
        return self.hp.eta * self.hp.eta if self.hp.eta_applied_twice else self.hp.eta

    def _train_rollout(self, turns: Sequence[Turn], t: int, *, last: bool) -> None:
        """EMSEdit sequential meta-training: one turn of a training rollout (spec §7.5.2).

        S steps are applied and kept; one loss at the final weights — Σ CE(paraphrases) plus the
        locality term (η·‖W − W_orig‖² over the whole rollout's drift, or KL against the weights at
        the start of the turn) — and the same Γ reaches every step's network. The rollout's edits
        accumulate; one Adam step at the end of the rollout (``optimizer_step: turn`` for one per turn).
        """
        turn = turns[t]
        refs = None
        if self.hp.loss == "kl":
            with self.timer.phase("train_locality_loss"):
                refs = self.reference_log_probs(turn.unrel)
        done: list[tuple[int, StepCache, Shifts]] = []
        for step in range(self.hp.steps):
            out = self._train_shift(turn, step)
            if out is None:
                continue
            self.apply(out[1])
            done.append((step, *out))
        self.zero_lm_grads()
        if done:
            with self.timer.phase("train_edit_loss"):
                edit = self.edit_loss([(turn, 1.0)])
            with self.timer.phase("train_locality_loss"):
                loc = self.kl_loss([(turn, 1.0)], refs) if refs is not None else self.add_l2_grad(self._rollout_eta())
            if math.isfinite(edit) and math.isfinite(loc):
                self._nonfinite_in_row = 0
                self.stats["losses"].append(round(edit + loc, 6))
                gammas = self.weight_grads()
                self.zero_lm_grads()
                self._update(done, gammas)
            else:
                self.zero_lm_grads()
                self._nonfinite("training loss", self.stats)
        if self.hp.optimizer_step == "turn" or last:
            self.optimizer_step()

    def _train_backtrack(self, turns: Sequence[Turn], t: int, *, last: bool) -> None:
        """RLEdit meta-training: one turn of a rollout with memory backtracking (spec §7.3).

        At each step the loss covers the paraphrases (and locality prompts) of this turn and of up to
        ``back_depth − 1`` earlier turns, weighted by ``time_decay^j``; the LM gradient is reset at
        each step, so every step's network receives the last step's Γ. The edit is kept.
        """
        depth = min(self.hp.back_depth, t + 1)
        loss_turns = [(turns[t - j], self.hp.time_decay ** j) for j in range(depth)]
        done: list[tuple[int, StepCache, Shifts]] = []
        gammas: Shifts | None = None
        for step in range(self.hp.steps):
            out = self._train_step(turns[t], step, loss_turns=loss_turns, eta=self.hp.eta)
            if out is None:
                continue
            done.append((step, *out))
            gammas = self.weight_grads()
            self.zero_lm_grads()
        if gammas is not None:
            self._update(done, gammas)
        if self.hp.optimizer_step == "turn" or last:
            self.optimizer_step()
