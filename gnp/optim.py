"""The optimiser: learning-rate schedules and the optax chain of a config."""

from __future__ import annotations

import optax

from gnp import transforms


def learning_rate_schedule(opt, steps_per_epoch: int, total_steps: int,
                           peak=None):
  """Linear warm-up from 0, then constant, cosine decay to 0, or steps.

  ``peak`` (default ``opt.learning_rate``) may be a traced array: the train
  step scales a unit schedule by the learning rate it holds in its state.
  """
  peak = opt.learning_rate if peak is None else peak
  warmup = round(opt.warmup_epochs * steps_per_epoch)
  rest = max(total_steps - warmup, 1)
  if opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, rest)
  elif opt.schedule == "step":
    main = optax.piecewise_constant_schedule(
        peak,
        {e * steps_per_epoch - warmup: opt.step_factor for e in opt.step_epochs},
    )
  else:
    main = optax.constant_schedule(peak)
  if not warmup:
    return main
  ramp = optax.linear_schedule(0.0, peak, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def build_optimizer(opt, schedule, weight_decay=None
                    ) -> optax.GradientTransformation:
  """Clipping -> coupled weight decay -> GC/NGS -> the optimiser.

  Which links the chain has is decided by ``opt``; ``weight_decay`` (default
  ``opt.weight_decay``) may be a traced array, as may the values ``schedule``
  returns, so one compiled step serves many hyper-parameter settings.
  """
  decay = opt.weight_decay if weight_decay is None else weight_decay
  chain = []
  if opt.grad_clip is not None:
    chain.append(optax.clip_by_global_norm(opt.grad_clip))
  if opt.weight_decay and opt.name != "adamw":
    # Coupled decay enters the gradient before GC/NGS, as in Yong et al.
    chain.append(optax.add_decayed_weights(decay))
  if opt.centralize:
    chain.append(transforms.centralize(conv_only=opt.transforms_conv_only))
  if opt.standardize:
    chain.append(transforms.standardize(conv_only=opt.transforms_conv_only))
  if opt.name == "sgd":
    chain.append(optax.sgd(schedule, momentum=opt.momentum or None,
                           nesterov=opt.nesterov))
  elif opt.name == "adam":
    chain.append(optax.adam(schedule, b1=opt.b1, b2=opt.b2))
  else:
    chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2,
                             weight_decay=decay))
  return optax.chain(*chain)
