"""Dynamic loss scaling for fp16 pipelines, with an overflow decision shared by every rank.

    scaler = LossScaler()                 # RanncModule(precision="fp16") owns one: model.scaler
    pipe.loss_scale = scaler.scale        # the last stage multiplies each microbatch loss by it
    ...                                   # after the schedule: grads /= scale, then
    scaler.update(found_inf)              # found_inf is all-reduced (MAX) over the world first
    if scaler.found_inf: skip optimizer.step()   # RanncModule wraps optimizer.step to do this

Unlike ``torch.amp.GradScaler`` the user never calls ``scale``/``unscale_``: gradients handed back to
``.grad`` are already unscaled. :attr:`found_inf` stays True from the overflowing forward until the
next (skipped) optimizer step, on every rank together.
"""

from __future__ import annotations


class LossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.enabled = enabled
        self.found_inf = False          # an overflow since the last optimizer step
        self.skipped_steps = 0
        self._good = 0

    def update(self, found_inf: bool) -> None:
        """Record one forward/backward pass: back off on overflow, grow after ``growth_interval`` good ones."""
        if not self.enabled:
            return
        if found_inf:
            self.found_inf = True
            self.scale *= self.backoff_factor
            self._good = 0
        else:
            self._good += 1
            if self._good >= self.growth_interval:
                self.scale *= self.growth_factor
                self._good = 0

    def consume_skip(self) -> bool:
        """Called at the optimizer step: True if this step must be skipped (and resets the flag)."""
        skip = self.found_inf
        if skip:
            self.skipped_steps += 1
        self.found_inf = False
        return skip

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self._good, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self._good = int(sd.get("growth_tracker", 0))
        self.skipped_steps = int(sd.get("skipped_steps", 0))
