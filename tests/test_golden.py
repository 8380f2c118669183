"""Golden values: one training step of the tiny config on eight fixed synthetic pairs.

A diff here means that something changed what a run computes: the initialisation, the data
encoding, the state sampling, a loss or the optimiser's input. If the change is intended (a fix),
update GOLDEN from the printed values and say in the commit message why the numbers moved; if it
is not, the diff is a bug. The tolerance (1e-4 relative) allows for float rounding across CPUs
and XLA versions, nothing more.
"""
import jax
import pytest

from rmjax import objective, sharding, train, train_state
from tests.helpers import pair_batch, tiny_config

# recorded 2026-12-03 after the contrastive fixes (negatives from the divergence on, InfoNCE
# excluding copies of a trajectory)
GOLDEN = {
    "bt": {"loss": 0.6937834, "bt_loss": 0.6937834, "grad_norm": 0.10204697},
    "paper": {"loss": 1.4135853, "bt_loss": 0.6937834, "contrastive_loss": 1.4396038,
              "grad_norm": 0.11496979},
    "infonce": {"loss": 5.3615222, "bt_loss": 0.6937834, "contrastive_loss": 9.3354778,
                "grad_norm": 1.7379777},
}


@pytest.mark.parametrize("variant", sorted(GOLDEN))
def test_one_training_step_of_the_tiny_config_gives_the_golden_values(mesh1, variant):
  config = tiny_config(variant)
  graphdef, state = train_state.create_state(config)
  step = jax.jit(train.make_train_step(graphdef, objective.build_terms(config.loss),
                                       accum_steps=1, seed=0))
  batch = pair_batch(8, max_len=config.data.max_len, split="train")
  _, metrics = step(state, sharding.host_to_global(batch, mesh1))
  got = {k: float(metrics[k]) for k in GOLDEN[variant]}
  for k, want in GOLDEN[variant].items():
    assert got[k] == pytest.approx(want, rel=1e-4), (
        f"{variant}: {k} = {got[k]:.7g}, golden {want:.7g}; all values now: {got}. See the "
        "module docstring: update GOLDEN only for an intended change, and say why.")
