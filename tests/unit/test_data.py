"""Protocol pydoc-v1 (design §2): the 80/20 split, disjoint calibration draws, the selection split, evaluation windows."""

import pytest
import torch

from absorbdeploy import data
from absorbdeploy.errors import UserError


@pytest.fixture(scope="module")
def corpus():
    from absorbdeploy.tiny import byte_tokenizer

    return data.build_corpus(byte_tokenizer(), None, None)


def test_the_split_is_the_first_80_percent_of_one_tokenisation(corpus):
    total = len(corpus.calibration_ids) + len(corpus.evaluation_ids)
    assert len(corpus.calibration_ids) == int(0.8 * total)
    text = data.pydoc_text()
    assert total == len(text.encode("utf-8")) and corpus.sha256 == data.sha256(text)
    assert corpus.name == data.PROTOCOL


def test_calibration_draws_are_consecutive_and_disjoint(corpus):
    a = data.calibration_windows(corpus, 4, 64, draw=0)
    b = data.calibration_windows(corpus, 4, 64, draw=1)
    assert a.shape == (4, 64) and torch.equal(a.reshape(-1), corpus.calibration_ids[:256])
    assert torch.equal(b.reshape(-1), corpus.calibration_ids[256:512])


def test_selection_windows_are_the_last_calibration_windows(corpus):
    sel = data.selection_windows(corpus, 3, 64)
    usable = len(corpus.calibration_ids) // 64 * 64
    assert torch.equal(sel.reshape(-1), corpus.calibration_ids[usable - 192:usable])


def test_evaluation_windows_drop_the_tail_and_respect_the_cap(corpus):
    every = data.eval_windows(corpus, 512, None)
    assert every.shape[0] == len(corpus.evaluation_ids) // 512
    assert torch.equal(data.eval_windows(corpus, 512, 3), every[:3])


def test_too_little_text_and_too_long_windows_are_user_errors(corpus):
    with pytest.raises(UserError, match="need"):
        data.calibration_windows(corpus, 10**6, 512)
    with pytest.raises(UserError, match="exceeds the model's context of 256"):
        data.check_context(256, 512)
    data.check_context(None, 10**6)


def test_a_user_text_file_is_tokenised_and_hashed(tmp_path):
    from absorbdeploy.tiny import byte_tokenizer

    calib, evaluation = tmp_path / "c.txt", tmp_path / "e.txt"
    calib.write_text("abc " * 500)
    evaluation.write_text("xyz " * 300)
    corpus = data.build_corpus(byte_tokenizer(), str(calib), str(evaluation))
    assert len(corpus.calibration_ids) == int(0.8 * 2000) and len(corpus.evaluation_ids) == 1200
    assert corpus.eval_name == str(evaluation) and corpus.eval_sha256 == data.sha256("xyz " * 300)
