"""TFDS builders on the real files, dataset dispatch from config, and the grain training pipeline:
per-host sharding, exact resume, length buckets. HH-RLHF text is never printed."""
import json
import threading
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from configs import gsm8k
from rmjax.data import readers, sources
from rmjax.data.pipeline import encode_pair, train_dataset
from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """Builds ``hh_rlhf`` and ``gsm8k_solutions/pairs`` once for the module."""
  if not DATA.is_dir():
    pytest.skip(f"real data folder {DATA} is absent")
  import tensorflow_datasets as tfds
  from rmjax.data import builders
  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for name in ("hh_rlhf", "gsm8k_solutions/pairs"):
    builders.build(name, source_dir=str(DATA), data_dir=data_dir)
  return data_dir


def data_config(name, tfds_dir, **data):
  c = gsm8k.get_config("tiny")
  c.data.name, c.data.tfds_dir, c.data.source_dir, c.data.tokenizer = name, tfds_dir, str(DATA), \
      "byte"
  c.data.update(data)
  return c


def test_gsm8k_pairs_build_and_split_by_problem(tfds_dir):
  config = data_config("gsm8k_solutions", tfds_dir)
  splits = {s: sources.make_source(config, s) for s in readers.SPLIT_FRACTIONS}
  assert {s: len(v) for s, v in splits.items()} == {"train": 1938, "validation": 246, "test": 242}
  problems = {s: {v[i]["problem_id"] for i in range(len(v))} for s, v in splits.items()}
  assert [len(p) for p in problems.values()] == [585, 73, 73]
  assert not (problems["train"] & problems["validation"] or problems["train"] & problems["test"]
              or problems["validation"] & problems["test"])
  ex = splits["validation"][0]
  assert isinstance(ex["chosen"], str) and isinstance(ex["problem_id"], int)  # decoded once
  _, pairs, _ = readers.gsm8k_solutions(str(DATA / "gsm8k" / "example_model_solutions.jsonl"))
  by_id = {p["id"]: p for p in pairs}
  assert all(by_id[v[i]["id"]]["rejected"] == v[i]["rejected"]
             for v in splits.values() for i in range(0, len(v), 50))


def test_hh_rlhf_shared_prefix_is_never_response(tfds_dir):
  config = data_config("hh_rlhf", tfds_dir)
  src, tok = sources.make_source(config, "train"), ByteTokenizer()
  assert len(src) == 1846 and len(sources.make_source(config, "validation")) == 231
  for i in range(0, len(src), 20):
    ex = src[i]
    p = encode_pair(ex, tok, max_len=8192)
    assert p["truncated"].tolist() == [0, 0]
    start = [int(np.argmax(p["response"][r])) for r in (0, 1)]
    assert start[0] == start[1] == len(ex["prompt"].encode())  # responses start after the prefix
    np.testing.assert_array_equal(p["tokens"][0, :start[0]], p["tokens"][1, :start[0]])
    assert bytes(p["tokens"][0, :start[0]].tolist()).endswith(b"\n\nAssistant:")
    for r, side in ((0, "chosen"), (1, "rejected")):
      assert tok.decode(p["tokens"][r][p["response"][r] == 1]) == ex[side]


def test_make_source_names_unknown_data_and_missing_split(tmp_path):
  config = data_config("gsm8k", str(tmp_path))
  with pytest.raises(ValueError, match="data.name='gsm8k': expected 'synthetic' or one of"):
    sources.make_source(config, "train")
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n")
  config = data_config("preference_jsonl", str(tmp_path), files=f"train={path}")
  assert sources.make_source(config, "train")[0]["chosen"] == "a"
  with pytest.raises(ValueError, match=r"no split 'validation'.*\['train'\]"):
    sources.make_source(config, "validation")
  config.data.files = str(path)
  with pytest.raises(ValueError, match="expected 'split=path,...'"):
    sources.make_source(config, "train")


def test_preference_jsonl_rows_map_back_to_their_lines(tmp_path):
  """The built split's order is not the file's: each row's ``id`` names its line."""
  lines = [{"prompt": f"Q{k}", "chosen": f"a{k}", "rejected": f"b{k}"} for k in range(24)]
  for k in range(0, 24, 3):
    lines[k].update(id=f"pair-{k}", problem_id=k // 6)
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  src = sources.make_source(data_config("preference_jsonl", str(tmp_path),
                                        files=f"train={path}"), "train")
  line_of = {l.get("id", str(k)): k for k, l in enumerate(lines)}
  rows = [src[i] for i in range(len(src))]
  assert sorted(line_of[r["id"]] for r in rows) == list(range(24))
  for r in rows:
    k = line_of[r["id"]]
    assert (r["prompt"], r["chosen"], r["rejected"]) == (f"Q{k}", f"a{k}", f"b{k}")
    assert r["problem_id"] == lines[k].get("problem_id", k)  # default: the line's index


# --- the training pipeline ---

def pair_texts(batch, tok=ByteTokenizer()):
  """(prompt + chosen, prompt + rejected) of each pair in a batch."""
  return [tuple(tok.decode(t[m == 1]) for t, m in zip(tokens, mask))
          for tokens, mask in zip(batch["tokens"], batch["mask"])]


@pytest.mark.parametrize("n_hosts, window", [(1, 1), (2, 1), (3, 1), (2, 2)])
def test_hosts_together_see_every_example_once_per_epoch(n_hosts, window):
  src = SyntheticMath(24, seed=5)
  index_of = {(src[i]["prompt"] + src[i]["chosen"], src[i]["prompt"] + src[i]["rejected"]): i
              for i in range(len(src))}
  assert len(index_of) == 24
  seen = []
  for host in range(n_hosts):
    it = iter(train_dataset(src, ByteTokenizer(), global_batch_size=6, max_len=80, seed=1,
                            sort_window=window,
                            shard_options=grain.sharding.ShardOptions(host, n_hosts)))
    for _ in range(24 // 6):  # one epoch of global batches
      batch = next(it)
      assert batch["tokens"].shape[0] == 6 // n_hosts
      seen += [index_of[p] for p in pair_texts(batch)]
  assert sorted(seen) == list(range(24))


def test_resume_equals_uninterrupted_with_buckets_and_threads():
  src = SyntheticMath(40, seed=2, max_steps=4)
  make = lambda: iter(train_dataset(src, ByteTokenizer(), global_batch_size=4, max_len=64, seed=3,
                                    buckets=(40, 48), sort_window=3, num_threads=2))
  first = make()
  uninterrupted = [next(first) for _ in range(20)]
  it = make()
  for _ in range(13):  # mid-window and past one epoch
    next(it)
  resumed = make()
  resumed.set_state(json.loads(json.dumps(it.get_state())))  # as a checkpoint stores it
  for want in uninterrupted[13:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_buckets_trim_only_padding_and_bound_compiled_shapes():
  src, tok = SyntheticMath(64, seed=4, max_steps=5), ByteTokenizer()
  kwargs = dict(global_batch_size=4, max_len=72, seed=0)
  plain = iter(train_dataset(src, tok, **kwargs))
  bucketed = iter(train_dataset(src, tok, buckets=(40, 56), **kwargs))
  step = jax.jit(lambda b: (b["tokens"] * b["mask"]).sum())
  for _ in range(32):
    full, cut = next(plain), next(bucketed)
    length = cut["tokens"].shape[-1]
    assert length == min(b for b in (40, 56, 72) if b >= full["mask"].sum(-1).max())
    for k in ("tokens", "mask", "response"):
      np.testing.assert_array_equal(cut[k], full[k][..., :length])
      assert not full["mask"][..., length:].any()
    step(cut)
  assert step._cache_size() <= 3  # one compilation per bucket, not per step


def test_processes_agree_on_each_bucketed_batch_length(monkeypatch):
  """Two simulated processes (threads) with buckets build one global shape each step: the global
  batch of one process, with the same buckets."""
  from rmjax.data import pipeline
  barrier, local = threading.Barrier(2, timeout=10), {}

  def process_max(value):  # the allgather of the two processes' values
    local[threading.current_thread().name] = value
    barrier.wait()
    longest = max(local.values())
    barrier.wait()  # both read before the next step writes
    return longest

  monkeypatch.setattr(pipeline, "process_max", process_max)
  src, tok = SyntheticMath(64, seed=4, max_steps=5), ByteTokenizer()
  make = lambda shard, count: iter(train_dataset(
      src, tok, global_batch_size=8, max_len=72, seed=0, buckets=(40, 56), padding_side="left",
      shard_options=grain.sharding.ShardOptions(shard, count, drop_remainder=True)))
  got = {}

  def run(process):
    it = make(process, 2)
    got[process] = [next(it) for _ in range(16)]

  threads = [threading.Thread(target=run, args=(i,), name=str(i)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  monkeypatch.undo()  # one process: no agreement needed
  one = make(0, 1)
  for a, b in zip(got[0], got[1]):
    want = next(one)
    for k in want:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), want[k])


def test_sorted_windows_cut_padding():
  src, tok = SyntheticMath(256, seed=6, min_steps=1, max_steps=6), ByteTokenizer()

  def padding(window):
    it = iter(train_dataset(src, tok, global_batch_size=8, max_len=80, seed=0, buckets=(
        32, 40, 48, 56, 64, 72), sort_window=window))
    batches = [next(it) for _ in range(32)]
    return sum((1 - b["mask"]).sum() for b in batches) / sum(b["mask"].size for b in batches)

  assert padding(8) < 0.5 * padding(1)


@pytest.mark.slow  # starting worker processes takes ~10 s on 2 cores
def test_worker_processes_give_the_same_batches_and_resume():
  src = SyntheticMath(40, seed=2)
  make = lambda workers: iter(train_dataset(src, ByteTokenizer(), global_batch_size=4, max_len=64,
                                            seed=3, buckets=(40, 48), sort_window=3,
                                            num_workers=workers))
  want = [b for b, _ in zip(make(0), range(14))]
  it = make(2)
  got = [next(it) for _ in range(10)]
  resumed = make(2)
  resumed.set_state(it.get_state())
  got += [next(resumed) for _ in range(4)]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["tokens"], w["tokens"])
