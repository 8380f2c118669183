"""Per-device memory of a training step before booking the machines (no device, no compile).

  python scripts/plan_memory.py --config=configs/synthetic.py --mesh=2,2,2 [--dcn_mesh=2,1,1] \
      [--config.model.remat=full --config.train.accum_steps=4 ...]

Prints bytes per device for parameters, optimiser state, gradients, the batch and activations
(``rmjax.memory``). Parameters, optimiser state, gradients and batch are exact; activations are an
estimate of what the backward pass keeps, for a compiler that honours remat (GPU/TPU XLA).
"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file [:arg].",
                                          lock_config=True)
_MESH = flags.DEFINE_list("mesh", None, "data,fsdp,tensor sizes (per slice with --dcn_mesh).")
_DCN = flags.DEFINE_list("dcn_mesh", None, "Slices per axis over DCN, e.g. 2,1,1.")
flags.mark_flags_as_required(["config", "mesh"])


def main(argv):
  del argv
  from rmjax import memory
  config = _CONFIG.value
  shape = tuple(int(x) for x in _MESH.value)
  dcn = tuple(int(x) for x in _DCN.value) if _DCN.value else None
  plan = memory.plan(config, shape, dcn)
  model = config.model
  print(f"mesh {shape}" + (f" x dcn {dcn}" if dcn else "") + f": {model.num_layers} layers, "
        f"dim {model.dim}, batch {config.train.batch_size} pairs x {config.data.max_len} tokens, "
        f"accum {config.train.accum_steps}, remat {model.remat}, compute {model.dtype}")
  print(plan.table())


if __name__ == "__main__":
  app.run(main)
