"""Per-device memory of a training step before booking the machines (no device, no compile).

  python scripts/plan_memory.py --config=configs/synthetic.py --mesh=2,2,2 [--dcn_mesh=2,1,1] \
      [--config.model.remat=full --config.train.accum_steps=4 ...]
  python scripts/plan_memory.py --config=configs/pod.py:8b --mesh=1,64,1 --backend=tpu
  python scripts/plan_memory.py --config=... --mesh=1,1,1 --compile   # + XLA's figures, here

Prints bytes per device for parameters, optimiser state, gradients, the batch and activations
(``rmjax.memory``). Parameters, optimiser state, gradients and batch are exact; activations are an
estimate of what the backward pass keeps, for a compiler that honours remat (GPU/TPU XLA).
``--compile`` also compiles the step on this machine's devices (the mesh must fit them; nothing
is allocated) and sets the plan beside XLA's ``memory_analysis()``: arguments (state + batch) and
temp (gradients + activations + XLA's scratch).
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file [:arg].",
                                          lock_config=True)
_MESH = flags.DEFINE_list("mesh", None, "data,fsdp,tensor sizes (per slice with --dcn_mesh).")
_DCN = flags.DEFINE_list("dcn_mesh", None, "Slices per axis over DCN, e.g. 2,1,1.")
_BACKEND = flags.DEFINE_enum("backend", "gpu", ["gpu", "tpu", "cpu"],
                             "The XLA backend planned for (rmjax.memory.plan): 'tpu' without remat "
                             "keeps more, 'cpu' ignores remat.")
_COMPILE = flags.DEFINE_bool("compile", False, "Also compile the step here and print XLA's "
                             "memory analysis beside the plan.")
flags.mark_flags_as_required(["config", "mesh"])


def main(argv):
  del argv
  from rmjax import memory
  config = _CONFIG.value
  shape = tuple(int(x) for x in _MESH.value)
  dcn = tuple(int(x) for x in _DCN.value) if _DCN.value else None
  plan = memory.plan(config, shape, dcn, backend=_BACKEND.value)
  model = config.model
  print(f"mesh {shape}" + (f" x dcn {dcn}" if dcn else "") + f": {model.num_layers} layers, "
        f"dim {model.dim}, batch {config.train.batch_size} pairs x {config.data.max_len} tokens, "
        f"accum {config.train.accum_steps}, remat {model.remat}, compute {model.dtype}, "
        f"XLA:{_BACKEND.value.upper()}")
  print(plan.table())
  if _COMPILE.value:
    import math

    import jax

    from rmjax import sharding
    n = math.prod(shape) * math.prod(dcn or (1,))
    if n > jax.device_count():
      raise app.UsageError(f"--compile: the mesh needs {n} devices, this machine has "
                           f"{jax.device_count()}")
    mesh = sharding.make_mesh(shape, jax.devices()[:n], dcn_shape=dcn)
    mib = memory.MiB
    print(f"\nplan vs XLA ({jax.devices()[0].device_kind}), MiB per device:")
    for name, (planned, xla) in memory.versus_xla(plan, memory.compiled(config, mesh)).items():
      print(f"{name:<12}{planned / mib:>12.2f} {xla / mib:>12.2f}  plan/XLA {planned / xla:.2f}")


if __name__ == "__main__":
  app.run(main)
