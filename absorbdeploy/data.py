"""Stage 2, data: text -> token windows under protocol `pydoc-v1` (design §2), or a user's text files.

pydoc-v1: Python's `pydoc_data.topics`, sorted by key and joined with blank lines, tokenised once without special tokens.
The first floor(0.8 T) tokens are the calibration split, the rest the evaluation split. Calibration uses `nsamples`
consecutive non-overlapping `seqlen` windows (draw d starts at window d*nsamples); the selection split, used to choose
defaults without touching evaluation data, is the last windows of the calibration split; perplexity uses the
non-overlapping windows of the evaluation split, tail dropped.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from absorbdeploy.errors import UserError

PROTOCOL = "pydoc-v1"
CALIBRATION_FRACTION = 0.8


@dataclass(frozen=True)
class Corpus:
    name: str  # "pydoc-v1" or the file path
    sha256: str
    calibration_ids: object  # 1-D LongTensor
    evaluation_ids: object  # 1-D LongTensor
    eval_name: str
    eval_sha256: str


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: str, what: str) -> str:
    file = Path(path).expanduser()
    if not file.exists():
        raise UserError(f"{what} not found: {path}")
    if not file.is_file():
        raise UserError(f"{what} {path} is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except PermissionError:
        raise UserError(f"cannot read {what} {path}: permission denied") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{what} {path} is empty")
    return text


def check_text_paths(calibration_text: str | None, eval_text: str | None) -> None:
    """Fail fast, before any model is loaded, on text files that are missing, unreadable or empty."""
    if calibration_text is not None:
        read_text(calibration_text, "calibration text")
    if eval_text is not None:
        read_text(eval_text, "evaluation text")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize(text: str, tokenizer):
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def build_corpus(tokenizer, calibration_text: str | None, eval_text: str | None) -> Corpus:
    text = pydoc_text() if calibration_text is None else read_text(calibration_text, "calibration text")
    name = PROTOCOL if calibration_text is None else calibration_text
    ids = tokenize(text, tokenizer)
    cut = int(CALIBRATION_FRACTION * len(ids))
    calibration, evaluation = ids[:cut], ids[cut:]
    eval_name, eval_hash = f"{name} (evaluation split)", sha256(text)
    if eval_text is not None:
        raw = read_text(eval_text, "evaluation text")
        evaluation, eval_name, eval_hash = tokenize(raw, tokenizer), eval_text, sha256(raw)
    return Corpus(name, sha256(text), calibration, evaluation, eval_name, eval_hash)


def calibration_windows(corpus: Corpus, nsamples: int, seqlen: int, draw: int = 0):
    """Windows [draw*nsamples, (draw+1)*nsamples) of the calibration split, each `seqlen` tokens: LongTensor [n, seqlen]."""
    available = len(corpus.calibration_ids) // seqlen
    needed = (draw + 1) * nsamples
    if needed > available:
        raise UserError(
            f"calibration text {corpus.name} has {len(corpus.calibration_ids)} calibration tokens, enough for "
            f"{available} windows of {seqlen}; need {needed} (nsamples {nsamples}, draw {draw}); "
            "use a longer text or lower calibration.nsamples / calibration.seqlen"
        )
    start = draw * nsamples * seqlen
    return corpus.calibration_ids[start : start + nsamples * seqlen].view(nsamples, seqlen).clone()


def selection_windows(corpus: Corpus, count: int, seqlen: int):
    """The last `count` windows of the calibration split: held out from calibration draws, never evaluation data."""
    available = len(corpus.calibration_ids) // seqlen
    if count > available:
        raise UserError(f"calibration split has {available} windows of {seqlen}, fewer than the {count} selection windows asked for")
    usable = corpus.calibration_ids[: available * seqlen].view(available, seqlen)
    return usable[available - count :].clone()


def eval_windows(corpus: Corpus, seqlen: int, max_windows: int | None):
    available = len(corpus.evaluation_ids) // seqlen
    if available == 0:
        raise UserError(f"evaluation text {corpus.eval_name} has {len(corpus.evaluation_ids)} tokens, fewer than one window of {seqlen}; lower validate.seqlen")
    count = available if max_windows is None else min(max_windows, available)
    return corpus.evaluation_ids[: count * seqlen].view(count, seqlen).clone()


def check_context(limit: int | None, seqlen: int) -> None:
    """Windows longer than the model's context (max_position_embeddings) would be scored past what it was trained on."""
    if limit is not None and seqlen > limit:
        raise UserError(f"seqlen {seqlen} exceeds the model's context of {limit} tokens; lower calibration.seqlen / validate.seqlen")
