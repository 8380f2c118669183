"""Every supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 2) against transformers' PyTorch
sequence classifiers on CPU: tiny random models whose weights are large enough to matter (std 0.3,
not HF's 0.02), windows shorter than the sequence, Gemma 2's soft cap small enough to bite."""
from types import SimpleNamespace

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference is transformers' PyTorch model")
transformers = pytest.importorskip("transformers")

from rmjax import sharding  # noqa: E402
from rmjax.convert import load_reward_model, pretrained_config  # noqa: E402
from rmjax.convert.export import export_reward_model, flat_params  # noqa: E402
from tests.helpers import assert_tree_close, relative_errors  # noqa: E402
from tests.test_convert import (exported_rewards, padded_batch, rmjax_forward,  # noqa: E402
                                save_tiny, torch_hidden)

# what each family's test model sets beyond tests/test_convert.ARCHS
FAMILIES = {
    "llama": {},  # llama3 rope scaling
    "mistral": {},  # window 5 on every layer, head_dim != dim / heads
    # HF windows layers >= max_window_layers: layer 1 of 2
    "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "qwen3": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                  max_window_layers=1),
    "gemma2": dict(num_hidden_layers=3, sliding_window=4),  # layers 0 and 2 windowed
}
STD = 0.3


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """One family's HF folder, PyTorch classifier, and rmjax's import on one device with its
  outputs on 8 rows of 12 tokens: rows 0-1 and 6-7 right-padded, 2-5 left-padded."""
  folder = tmp_path_factory.mktemp(request.param)
  ref = save_tiny(request.param, folder, classifier=True, std=STD, **FAMILIES[request.param])
  tokens, mask = padded_batch()
  tokens, mask = np.concatenate([tokens, tokens[::-1]]), np.concatenate([mask, mask[::-1]])
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  model, reward, h = rmjax_forward(folder, mesh, tokens, mask)
  return SimpleNamespace(name=request.param, folder=folder, ref=ref, mesh=mesh, model=model,
                         tokens=tokens, mask=mask, reward=reward, h=h)


def torch_rewards(model, tokens, mask):
  """The classifier's rewards (at the last non-pad token), positions counted over real tokens."""
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits[:, 0].numpy()


def test_hidden_states_and_rewards_match_transformers(family):
  f = family
  tokens, mask, real = f.tokens[:4], f.mask[:4], f.mask[:4].astype(bool)
  h, h_ref = f.h[:4], torch_hidden(f.ref, tokens, mask)
  got = {"h_right": h[:2][real[:2]], "h_left": h[2:][real[2:]], "reward": f.reward[:4]}
  want = {"h_right": h_ref[:2][real[:2]], "h_left": h_ref[2:][real[2:]],
          "reward": torch_rewards(f.ref, tokens, mask)}
  print(f.name, {k: f"{v:.1e}" for k, v in relative_errors(got, want).items()})
  assert_tree_close(got, want, rtol=1e-4)


def test_export_then_reimport_gives_the_same_tensors_and_transformers_scores(family, tmp_path):
  f = family
  export_reward_model(f.model, tmp_path / "out", tokenizer=None)
  with sharding.use_mesh(f.mesh):
    back = load_reward_model(str(tmp_path / "out"), pretrained_config(str(tmp_path / "out")),
                             f.mesh)
  assert back.backbone.cfg == f.model.backbone.cfg
  before, after = flat_params(f.model), flat_params(back)
  assert sorted(before) == sorted(after)
  for path, w in before.items():
    np.testing.assert_array_equal(after[path], w, err_msg=path)
  exported = exported_rewards(tmp_path / "out", f.tokens, f.mask)
  print(f.name, f"exported, under transformers: {relative_errors(exported, f.reward)['']:.1e}")
  assert_tree_close(exported, f.reward, rtol=1e-4)


def test_scan_layers_and_sparse_last_block_equal_the_plain_forward(family):
  f = family
  _, reward_s, h_s = rmjax_forward(f.folder, f.mesh, f.tokens, f.mask, scan_layers=True)
  assert_tree_close({"h": h_s, "reward": reward_s}, {"h": f.h, "reward": f.reward}, rtol=1e-5)
  rows = np.array([[8, 3], [11, 0], [11, 6], [11, 5]] * 2, np.int32)  # incl. each last token
  with sharding.use_mesh(f.mesh):
    h_rows = np.asarray(jax.jit(lambda t, m, r: f.model.backbone(t, m, r))(f.tokens, f.mask,
                                                                           rows))
  assert_tree_close(h_rows, np.take_along_axis(f.h, rows[..., None], axis=1), rtol=1e-5)


def test_import_onto_8_devices_equals_one(family):
  f = family
  model8, r8, h8 = rmjax_forward(f.folder, sharding.make_mesh((2, 2, 2)), f.tokens, f.mask)
  q = model8.backbone.layers[0].attn.q.kernel[...]
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.size < q.size
  assert_tree_close({"h": h8, "reward": r8}, {"h": f.h, "reward": f.reward}, rtol=1e-5)


def test_init_from_takes_the_family_switches_as_architecture(family):
  from rmjax import train_state
  from tests.helpers import tiny_config
  config = tiny_config("paper")
  for field in list(config.model):
    if field not in train_state.ARCH_EXEMPT:
      setattr(config.model, field, None)  # the architecture comes from the checkpoint
  config.model.init_from = str(family.folder)
  assert train_state.model_config(config) == family.model.backbone.cfg
  flipped = not family.model.backbone.cfg.norm_plus_one  # a switch a config may not override
  config.model.norm_plus_one = flipped
  with pytest.raises(ValueError, match=rf"disagrees with the config on model.norm_plus_one="
                     rf"{flipped}"):
    train_state.model_config(config)


def test_family_switches_are_config_fields_defaulting_to_off():
  """``config.model`` carries every family switch: None builds a new model with LlamaConfig's
  default (off), a value reaches the model (``--config.model.qk_norm=True``)."""
  from rmjax.train_state import model_config
  from tests.helpers import tiny_config
  config = tiny_config("bt")
  switches = ("sliding_window", "sliding_layers", "qk_norm", "norm_plus_one", "sandwich_norms",
              "embed_scale", "mlp_act", "attn_softcap", "query_pre_attn_scalar")
  from rmjax.models import LlamaConfig
  default = LlamaConfig()
  assert {k: getattr(model_config(config), k) for k in switches} == {
      k: getattr(default, k) for k in switches}
  config.model.qk_norm, config.model.mlp_act = True, "gelu_tanh"
  cfg = model_config(config)
  assert cfg.qk_norm and cfg.mlp_act == "gelu_tanh"
