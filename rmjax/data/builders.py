"""TFDS builders (array_record, no TensorFlow at run time) for the real preference data.

Built once into ``data_dir`` (TFDS default ``~/tensorflow_datasets``, or ``$TFDS_DATA_DIR``) from
source files under ``source_dir`` (TFDS's *manual dir*; configs use ``../shared/data``), read back
with random access by ``load_split`` for grain. Splits are by problem / dialogue / question
(``readers.SPLIT_FRACTIONS``, 80/10/10, seeded permutation of the group ids with ``SPLIT_SEED``),
one split per dataset (``_split_of``): every config of it puts a problem in the same split.

  python -m rmjax.data.builders --name=gsm8k_solutions/pairs --source_dir=../shared/data

Builders (``name/config``): ``gsm8k_solutions/pairs`` (default) and ``gsm8k_solutions/solutions``,
``gsm8k_perturbed``, ``hh_rlhf``, ``finegrained_qa/decisive`` (default) and
``finegrained_qa/with_ties``, ``preference_jsonl`` (user files, see ``preference_jsonl_builder``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from rmjax.data import readers

log = logging.getLogger(__name__)

SPLIT_SEED = 0  # which problems land in which split
PERTURB_SEED = 0  # which step and digit gsm8k_perturbed changes
text, int32, float32 = tfds.features.Text(), np.int32, np.float32


def _features(**kinds) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({k: v if isinstance(v, tfds.features.Text) else
                                     tfds.features.Scalar(v) for k, v in kinds.items()})


class _Builder(tfds.core.GeneratorBasedBuilder):
  """Reads one source file (under the manual dir) and splits its examples by ``group``."""
  VERSION = tfds.core.Version("1.0.0")
  SOURCE = ""  # path under source_dir
  GROUP = ""  # field whose value decides the split (no group in two splits)
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass source_dir (config data.source_dir): the folder of "
                                  "../shared/data/README.md.")

  def _split_generators(self, dl_manager):
    path = os.fspath(dl_manager.manual_dir / self.SOURCE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{self.name}: source file {path} does not exist")
    examples, summary = self._read(path)
    log.info("%s from %s: %d examples; %s", self.info.full_name, path, len(examples),
             dict(summary) or "nothing skipped")
    split_of = self._split_of(path, examples)
    return {split: self._generate_examples([ex for ex in examples
                                            if split_of[str(ex[self.GROUP])] == split])
            for split in readers.SPLIT_FRACTIONS}

  def _generate_examples(self, examples):
    for ex in examples:
      yield ex["id"], {k: ex[k] for k in self.info.features}

  def _read(self, path):
    raise NotImplementedError

  def _split_of(self, path, examples) -> dict[str, str]:
    """``str(group)`` -> split: the dataset's one split, the same for each of its configs."""
    return readers.split_groups([ex[self.GROUP] for ex in examples], SPLIT_SEED)


class Gsm8kSolutions(_Builder):
  """GSM8K test problems, four model solutions each: (correct, incorrect) pairs or all solutions."""
  SOURCE, GROUP = "gsm8k/example_model_solutions.jsonl", "problem_id"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "solutions: split by the pairs' problem split (problems without a "
                            "pair split among themselves); pairs unchanged"}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="pairs", description="every (correct, incorrect) pair"),
      tfds.core.BuilderConfig(name="solutions", description="every labelled solution (AUROC)")]

  def _info(self):
    if self.builder_config.name == "pairs":
      features = _features(id=text, problem_id=int32, prompt=text, chosen=text, rejected=text,
                           chosen_model=text, rejected_model=text)
    else:
      features = _features(id=text, problem_id=int32, prompt=text, response=text,
                           is_correct=np.bool_, model=text)
    return self.dataset_info_from_configs(features=features)

  def _read(self, path):
    solutions, pairs, summary = readers.gsm8k_solutions(path)
    return (pairs if self.builder_config.name == "pairs" else solutions), summary

  def _split_of(self, path, examples):
    """Problems with a pair split as the pairs alone are; the others among themselves."""
    solutions, pairs, _ = readers.gsm8k_solutions(path)
    return readers.split_groups([s["problem_id"] for s in solutions], SPLIT_SEED,
                                first=[p["problem_id"] for p in pairs])


class Gsm8kPerturbed(_Builder):
  """GSM8K train reference solutions vs the same with one calculation result changed."""
  SOURCE, GROUP = "gsm8k/train.jsonl", "problem_id"

  def _info(self):
    return self.dataset_info_from_configs(features=_features(
        id=text, problem_id=int32, prompt=text, chosen=text, rejected=text, error_step=int32,
        error_char=int32))

  def _read(self, path):
    return readers.gsm8k_perturbed(path, PERTURB_SEED)


class HhRlhf(_Builder):
  """Anthropic HH-RLHF (harmless-base test file): shared dialogue prefix + final responses."""
  SOURCE, GROUP = "hh-rlhf/harmless-base-test.jsonl.gz", "prompt"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "problem_id: the dialogue (prompt) number"}

  def _info(self):
    return self.dataset_info_from_configs(features=_features(
        id=text, problem_id=int32, prompt=text, chosen=text, rejected=text))

  def _read(self, path):
    return readers.hh_rlhf(path)


class FinegrainedQa(_Builder):
  """FineGrainedRLHF long-form QA: pairs from the 6 human judgements per question."""
  SOURCE, GROUP = "finegrained-qa/dev_feedback.json", "question_id"
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.1.0": "problem_id (= question_id) for the by-problem bootstrap",
                   "1.2.0": "with_ties: split by the decisive pairs' question split (questions "
                            "with only ties split among themselves); decisive unchanged"}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="decisive", description="ties dropped; label 1.0"),
      tfds.core.BuilderConfig(name="with_ties", description="ties kept with label 0.5")]

  def _info(self):
    return self.dataset_info_from_configs(features=_features(
        id=text, question_id=int32, problem_id=int32, prompt=text, chosen=text, rejected=text,
        label=float32))

  def _read(self, path):
    return readers.finegrained_qa(path, keep_ties=self.builder_config.name == "with_ties")

  def _split_of(self, path, examples):
    """Questions with a decisive pair split as the decisive pairs alone are; the others among
    themselves."""
    decisive, _ = readers.finegrained_qa(path)
    every, _ = readers.finegrained_qa(path, keep_ties=True)
    return readers.split_groups([p["question_id"] for p in every], SPLIT_SEED,
                                first=[p["question_id"] for p in decisive])


@dataclasses.dataclass(eq=False)
class PreferenceJsonlConfig(tfds.core.BuilderConfig):
  files: tuple = ()  # ((split, path), ...)


class PreferenceJsonl(tfds.core.GeneratorBasedBuilder):
  """User ``.jsonl`` files of pairs, one per split (``readers.preference_jsonl``); rows come back
  in another order than the file's: ``id`` names each one's line."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "problem_id (the line's, else its index) for the by-problem bootstrap"}

  def _info(self):
    return self.dataset_info_from_configs(features=_features(
        id=text, problem_id=np.int64, prompt=text, chosen=text, rejected=text,
        chosen_messages=text, rejected_messages=text, margin=float32))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(path) for split, path in self.builder_config.files}

  def _generate_examples(self, path):
    pairs, summary = readers.preference_jsonl(path)
    log.info("%s: %d pairs; %s", path, len(pairs), dict(summary) or "nothing skipped")
    for i, ex in enumerate(pairs):
      yield i, ex


def preference_jsonl_builder(files: dict[str, str], data_dir: str | None = None):
  """A ``PreferenceJsonl`` for ``{split: path}``; its config name changes with the files' path,
  size and modification time, so an edited file is built anew."""
  files = tuple(sorted((s, os.path.abspath(os.path.expanduser(p))) for s, p in files.items()))
  for _, path in files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"preference_jsonl: {path} does not exist")
  key = repr([(s, p, os.path.getsize(p), os.path.getmtime(p)) for s, p in files])
  name = "f" + hashlib.sha256(key.encode()).hexdigest()[:12]
  return PreferenceJsonl(config=PreferenceJsonlConfig(name=name, files=files), data_dir=data_dir,
                         file_format="array_record")


def build(name: str, *, source_dir: str = "", data_dir: str | None = None, files=None):
  """The prepared builder ``name`` (``"builder[/config]"``); prepares it on first use."""
  if name.split("/")[0] == "preference_jsonl":
    builder = preference_jsonl_builder(files or {}, data_dir)
  else:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(os.path.expanduser(source_dir)) if source_dir else None))
  return builder


class Source:
  """Random-access split of a prepared builder; TFDS text (bytes) is decoded here, only here."""

  def __init__(self, builder, split: str):
    if split not in builder.info.splits:
      raise ValueError(f"{builder.info.full_name} has no split {split!r}; it has "
                       f"{sorted(builder.info.splits)}")
    self.data = builder.as_data_source(split=split)
    self.name = f"{builder.info.full_name}[{split}]"

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, index: int) -> dict:
    return {k: v.decode("utf-8") if isinstance(v, bytes) else np.asarray(v).item()
            for k, v in self.data[index].items()}

  def __repr__(self) -> str:
    return f"Source({self.name}, {len(self)} examples)"


def load_split(name: str, split: str, **build_kwargs) -> Source:
  return Source(build(name, **build_kwargs), split)


def main():
  import argparse
  parser = argparse.ArgumentParser(description="Prepare an rmjax TFDS dataset.")
  parser.add_argument("--name", required=True, help="e.g. gsm8k_solutions/pairs, hh_rlhf")
  parser.add_argument("--source_dir", default="../shared/data")
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO)
  builder = build(args.name, source_dir=args.source_dir, data_dir=args.data_dir)
  print(builder.info.full_name, {s: v.num_examples for s, v in builder.info.splits.items()},
        builder.data_dir)


if __name__ == "__main__":
  main()
