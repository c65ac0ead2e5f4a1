"""vllm_doge/keep_window.py: when the keep window binds. The keep window's ops are tested against a
float64 reference in test_keep_window_ops.py, and served end to end against doge_hf in test_model.py."""

import pytest

from vllm_doge.keep_window import keep_window_binds


def test_keep_window_binds():
    assert not keep_window_binds(16, None, 16)
    assert keep_window_binds(16, None, 17)
    assert not keep_window_binds(None, None, 4096)
    assert not keep_window_binds(16, 16, 512)  # a sliding window no wider than W: the kernel alone
    with pytest.raises(ValueError, match="sliding_window 24"):
        keep_window_binds(16, 24, 512)
