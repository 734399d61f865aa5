"""bench/profile_exp1.py: its checks before any work (CPU, fast), and the whole profile on a GPU at a small size
(the acceptance size runs by hand: `python -m bench.profile_exp1 --out DIR`)."""
import json

import pytest

from bench.profile_exp1 import main


@pytest.mark.parametrize("argv, match", [(["--steps", "0"], "--steps must be >= 1"),
                                         (["--canaries", "1"], "--canaries must be >= 2"),
                                         (["--candidates", "-5"], "--candidates must be >= 2")])
def test_bad_arguments_stop_before_any_work(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        main(argv + ["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing was written: refused before loading anything


@pytest.mark.gpu
def test_profile_on_the_tiny_model(tmp_path):
    main(["--model", "tiny", "--device", "cuda", "--canaries", "10", "--candidates", "64", "--decisive", "128",
          "--steps", "2", "--tf32", "both", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "profile_exp1.json").read_text())
    # fails if a phase went untimed or the TF32 comparison did not run both ways
    assert len(out["phases"]) == 4 and all(v > 0 for v in out["phases"].values())
    assert set(out["evaluation"]) == {"fp32", "tf32"} and out["max_abs_logp_diff_fp32_tf32"] is not None
    assert out["top_ops_scoring_one_canary"] and out["top_ops_ortho_step"]
