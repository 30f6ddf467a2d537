"""A compiled function that raised once keeps failing (MindSpore 2.10), so tc2's caches of
compiled functions forget them after a failure (tc2.compiled)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import ops

from tc2.compiled import forget_after_failure

TABLE = ms.Tensor(np.arange(12, dtype=np.float32).reshape(4, 3))
GOOD, BAD = ms.Tensor(np.array([1, 2], np.int32)), ms.Tensor(np.array([1, 9], np.int32))


def _gather_sum(table, idx):
    return ops.gather(table, idx, 0).sum()


@forget_after_failure
def _cached_gather():
    return ms.jit(_gather_sum)


def test_mindspore_keeps_failing_after_one_error():
    """The behaviour `forget_after_failure` works around; if MindSpore fixes it, this fails and
    the wrapper can go."""
    f = ms.jit(_gather_sum)
    assert float(f(TABLE, GOOD).asnumpy()) == 33.0
    with pytest.raises(RuntimeError, match="Gather"):
        f(TABLE, BAD)
    with pytest.raises(RuntimeError, match="Invalid output number"):
        f(TABLE, GOOD)


def test_a_cached_compiled_function_recovers_after_a_failure():
    assert float(_cached_gather()(TABLE, GOOD).asnumpy()) == 33.0
    with pytest.raises(RuntimeError, match="Gather"):
        _cached_gather()(TABLE, BAD)
    assert float(_cached_gather()(TABLE, GOOD).asnumpy()) == 33.0       # compiled anew
    assert _cached_gather.cache_info().currsize == 1


def test_the_model_forward_recovers_after_an_out_of_range_token():
    from tc2.config import tiny
    from tc2.model import init_params, jit_forward
    cfg = tiny(n_layer=1)
    params = init_params(cfg, 0)
    tokens = np.array([[5, 6, 7, 8]], np.int32)
    want = jit_forward(params, ms.Tensor(tokens), cfg).asnumpy()
    with pytest.raises(RuntimeError):
        jit_forward(params, ms.Tensor(tokens + cfg.vocab_size), cfg)
    np.testing.assert_array_equal(jit_forward(params, ms.Tensor(tokens), cfg).asnumpy(), want)
