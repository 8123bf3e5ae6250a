"""The PNG plots: which files an absorption result produces (the sweep needs three eps), that the JSON beside them holds
the numbers unchanged, and that figures are real PNGs sized by the number of blocks."""

import json
import struct

from absorbdeploy import plots


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def _absorption(eps_values, n=4, stride_skips=()):
    def rows(scale):
        return [[None if k < l or l in stride_skips else scale * (1 + l) * 1.5 ** (k - l) for k in range(n)] for l in range(n)]

    curves = {str(e): {"rel": rows(e), "abs": rows(2 * e)} for e in eps_values}
    return {"definition": "margin", "strength": 0.08, "base": [0.5] * n, "final": [0.45, 0.5, 0.5, 0.55][:n],
            "curves": curves}


def test_three_eps_give_drift_sweep_and_allocation_plots(tmp_path):
    absorption = _absorption([0.01, 0.1, 1.0], stride_skips=(1,))  # a block the injection stride skipped
    plots.write_absorption(tmp_path, absorption)
    assert json.loads((tmp_path / "absorption.json").read_text()) == absorption
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["absorption.png", "absorption_allocation.png",
                                                             "absorption_eps.png"]
    assert _png_size(tmp_path / "absorption.png") == (5 * 4 * 110, int(4.2 * 110))  # one panel per eps + the heat map
    assert _png_size(tmp_path / "absorption_eps.png") == (11 * 110, int(4.4 * 110))


def test_fewer_eps_leave_out_the_sweep_and_no_curves_leave_out_the_drift(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    plots.write_absorption(one, _absorption([1.0]))
    assert sorted(p.name for p in one.glob("*.png")) == ["absorption.png", "absorption_allocation.png"]
    none = tmp_path / "none"
    none.mkdir()
    plots.write_absorption(none, {**_absorption([1.0]), "curves": None})
    assert sorted(p.name for p in none.glob("*.png")) == ["absorption_allocation.png"]


def test_allocation_bars_widen_with_the_number_of_blocks(tmp_path):
    plots.allocation_bars([0.5] * 4, [0.5] * 4, None, tmp_path / "few.png", "few")
    plots.allocation_bars([0.5] * 40, [0.4 + 0.005 * i for i in range(40)], [0.5] * 40, tmp_path / "many.png", "many")
    assert _png_size(tmp_path / "few.png") == (6 * 110, int(3.8 * 110))
    assert _png_size(tmp_path / "many.png") == (round((0.3 * 40 + 2) * 110), int(3.8 * 110))


def test_ppl_ratio_bars_with_and_without_a_gate(tmp_path):
    report = {"artefacts": {"vllm": {"ppl_ratio": 1.1}, "onnx": {"error": "failed"}},
              "recipe": {"validate": {"gates": {"max_ppl_ratio": 1.2}}}}
    plots.ppl_ratio_bars(report, tmp_path / "gated.png")
    report["recipe"]["validate"]["gates"]["max_ppl_ratio"] = None
    plots.ppl_ratio_bars(report, tmp_path / "open.png")
    assert _png_size(tmp_path / "gated.png") == _png_size(tmp_path / "open.png") == (6 * 110, int(3.5 * 110))
